from __future__ import annotations

import pytest

from tlimage import Image, ir
from tlimage.errors import DSLError


def test_builders_never_mutate() -> None:
    base = Image("a").run("echo base")
    one = base.run("echo one")
    two = base.env("X", "1")
    assert len(base.steps) == 1
    assert one.steps[-1] == ir.Run(command=("echo one",))
    assert two.steps[-1] == ir.Env(vars=(("X", "1"),))
    assert base.to_ir().digest() != one.to_ir().digest() != two.to_ir().digest()


@pytest.mark.parametrize(
    "call",
    [
        lambda i: i.run([]),
        lambda i: i.run(""),
        lambda i: i.run(["  ", ""]),
        lambda i: i.pip_install(),
        lambda i: i.apt_install([]),
        lambda i: i.expose(),
        lambda i: i.volume(),
        lambda i: i.copy([], "/x"),
    ],
)
def test_empty_calls_add_no_step(call) -> None:  # noqa: ANN001
    img = Image("a")
    assert call(img) is img


def test_each_step_records_its_call_site() -> None:
    img = Image("a").run("x").env("K", "v")
    spans = [m.span for m in img.to_ir().stages[0].meta]
    assert all(s is not None and s.file.endswith("test_dsl.py") for s in spans)
    assert spans[1].line == spans[2].line  # one chained expression on one line


def test_errors_name_the_call_site_and_what_is_allowed() -> None:
    with pytest.raises(DSLError) as info:
        Image("a").run("x", options={"nework": "none"})
    assert info.value.where is not None and "test_dsl.py:" in info.value.where
    assert "run(): unknown option 'nework'; allowed: env, force, mounts, network" in str(info.value)


def test_run_options_lower_to_fields() -> None:
    img = Image("a").run(
        "x",
        options={"env": {"A": "1"}, "user": "app", "workdir": "/w", "network": "none",
                 "mounts": [{"type": "cache", "target": "/c", "id": "pip"}], "force": True},
    )  # fmt: skip
    step = img.steps[-1]
    assert step == ir.Run(
        command=("x",), env=(("A", "1"),), user="app", workdir="/w", network="none",
        mounts=(ir.CacheMount("/c", id="pip"),),
    )  # fmt: skip
    assert img.to_ir().stages[0].meta[-1].force


def test_pinned_base() -> None:
    base = Image("a", base_image="debian-minimal@abc").to_ir().stages[0].base
    assert base == ir.From(image="debian-minimal", pin="abc")


def test_entrypoint_and_cmd_forms() -> None:
    img = Image("a").entrypoint(["python3", "-m", "app"]).cmd("serve --port 80")
    assert img.steps == (
        ir.Entrypoint(command=("python3", "-m", "app"), shell=False),
        ir.Cmd(command=("serve --port 80",), shell=True),
    )


def test_public_api_is_pinned() -> None:
    import tlimage

    assert tlimage.__all__ == [
        "Image", "ImageDef", "Sandbox", "TlimageError", "build", "build_image", "function", "load",
    ]  # fmt: skip
    for name in tlimage.__all__:
        assert getattr(tlimage, name) is not None
