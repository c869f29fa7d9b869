"""The build loop with the in-process fake executor: cache hits and misses step by step,
--explain, failures, and what gets registered. (tests/vm runs the same through real backends.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlimage.builder import build, build_image
from tlimage.errors import StepFailed, TlimageError
from tlimage.executor.fake import FakeExecutor
from tlimage.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root (mknod)")

IMAGE = """\
from tlimage import Image

image = (
    Image("app", base_image="busybox")
    .run("write /etc/first one")
    .copy("src/", "/app/")
    .env("MODE", "{mode}")
    .run("write /app/built yes")
    .copy("data.txt", "/data.txt")
)
"""


def project(tmp_path: Path, mode: str = "dev") -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "main.py").write_text("print('hi')\n")
    (tmp_path / "src" / "util.py").write_text("X = 1\n")
    (tmp_path / "data.txt").write_text("data\n")
    (tmp_path / "image.py").write_text(IMAGE.format(mode=mode))
    return tmp_path / "image.py"


def run(path: Path, **kw):  # noqa: ANN201
    events: list[dict] = []
    ex = FakeExecutor()
    result = build_image(path, emit=events.append, executor=ex, **kw)
    return result, events, ex


def statuses(events: list[dict]) -> list[tuple[int, str]]:
    """(step index, 'cached' | 'run' | 'config') for steps after FROM."""
    out = []
    for e in events:
        if e["event"] == "step_cached" and e["index"] > 0:
            out.append((e["index"], "cached"))
        elif e["event"] == "step_done":
            out.append((e["index"], "config" if e.get("config_only") else "run"))
    return out


def test_second_build_is_fully_cached(tmp_path: Path) -> None:
    path = project(tmp_path)
    first, ev1, ex1 = run(path)
    assert statuses(ev1) == [(1, "run"), (2, "run"), (3, "config"), (4, "run"), (5, "run")]
    assert len(ex1.runs) == 2
    second, ev2, ex2 = run(path)
    assert statuses(ev2) == [(1, "cached"), (2, "cached"), (3, "config"), (4, "cached"),
                             (5, "cached")]  # fmt: skip
    assert ex2.runs == []
    assert second.image_id == first.image_id
    kinds = [e["event"] for e in ev2]
    assert kinds[-3:] == ["snapshot_created", "image_registered", "done"]


def test_touch_alone_is_a_full_hit(tmp_path: Path) -> None:
    path = project(tmp_path)
    run(path)
    for f in (tmp_path / "src" / "main.py", tmp_path / "data.txt"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    _, events, ex = run(path)
    assert ex.runs == []
    assert all(s == "cached" for _, s in statuses(events) if s != "config")


def test_a_changed_file_rebuilds_exactly_the_steps_that_follow_it(tmp_path: Path) -> None:
    path = project(tmp_path)
    run(path)
    (tmp_path / "src" / "util.py").write_text("X = 2\n")
    _, events, ex = run(path, explain=True)
    assert statuses(events) == [(1, "cached"), (2, "run"), (3, "config"), (4, "run"),
                                (5, "run")]  # fmt: skip
    assert len(ex.runs) == 1  # the RUN after the COPY
    reasons = {e["index"]: e["reason"] for e in events if e["event"] == "explain"}
    assert reasons[2] == "files changed: src/util.py (changed)"
    assert reasons[4] == "an earlier step changed"


def test_a_changed_file_late_in_the_build_keeps_everything_before(tmp_path: Path) -> None:
    path = project(tmp_path)
    run(path)
    (tmp_path / "data.txt").write_text("new data\n")
    _, events, ex = run(path)
    assert statuses(events)[-1] == (5, "run")
    assert all(s in ("cached", "config") for _, s in statuses(events)[:-1])
    assert ex.runs == []


def test_explain_names_the_env_var_that_changed(tmp_path: Path) -> None:
    path = project(tmp_path, mode="dev")
    run(path)
    project(tmp_path, mode="prod")
    _, events, _ = run(path, explain=True)
    reasons = {e["index"]: e["reason"] for e in events if e["event"] == "explain"}
    assert reasons[4] == "env MODE changed: 'dev' -> 'prod'"


def test_no_cache_and_force_rerun_steps(tmp_path: Path) -> None:
    path = project(tmp_path)
    run(path)
    _, _, ex = run(path, no_cache=True)
    assert len(ex.runs) == 2
    (tmp_path / "image.py").write_text(IMAGE.format(mode="dev").replace(
        '.run("write /app/built yes")',
        '.run("write /app/built yes", options={"force": True})'))  # fmt: skip
    _, _, ex = run(path)
    assert [r.argv[-1] for r in ex.runs] == ["write /app/built yes"]


def test_failing_step_reports_its_line_and_registers_nothing(tmp_path: Path) -> None:
    (tmp_path / "image.py").write_text(
        textwrap.dedent("""\
        from tlimage import Image

        image = (
            Image("broken", base_image="busybox")
            .run("echo one; echo two")
            .run("echo about to fail; fail no such package")
        )
    """)
    )
    with pytest.raises(StepFailed) as info:
        run(tmp_path / "image.py")
    err = info.value
    assert err.location == "image.py:6" or err.location.endswith("image.py:6")
    assert err.step_exit_code == 1
    assert err.log_tail == ("about to fail", "no such package")
    assert "RUN echo about to fail; fail no such package failed with exit code 1" in str(err)
    assert Registry().find("default", "broken") is None


def test_events_generator_ends_with_error(tmp_path: Path) -> None:
    (tmp_path / "image.py").write_text(
        "from tlimage import Image\nimage = Image('b', base_image='busybox').run('fail boom')\n"
    )
    events = list(build(tmp_path / "image.py", executor=FakeExecutor()))
    assert events[-1]["event"] == "error"
    assert events[-1]["at"].endswith("image.py:2")
    assert events[-1]["log_tail"] == ["boom"]
    assert events[-1]["file"].endswith("image.py")
    assert (events[-1]["line"], events[-1]["column"], events[-1]["json_path"]) == (2, 1, None)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("Dockerfile", "FROM busybox\nRUN --mount=type=nope true\n", (2, None)),
        (
            "image.py",
            "from tlimage import Image\nimage = Image('b').run('x', {'mounts': [1]})\n",
            (2, None),
        ),
        (
            "image.json",
            '{"type": "image", "name": "b", "operations": [\n'
            '  {"op": "RUN", "args": ["x"], "options": {"mounts": ["type=nope"]}}]}\n',
            (2, "operations[0].options.mounts[0]"),
        ),
    ],
)
def test_error_events_carry_the_place_as_fields(tmp_path: Path, name: str, text: str,
                                                where: tuple) -> None:  # fmt: skip
    (tmp_path / name).write_text(text)
    events = list(build(tmp_path / name, executor=FakeExecutor()))
    err = events[-1]
    assert err["event"] == "error"
    assert err["file"].endswith(name)
    assert err["line"] == where[0]
    assert isinstance(err["column"], int) and err["column"] >= 1
    assert err["json_path"] == where[1]
    assert f":{where[0]}:" in err["message"]  # the message keeps the place too


def test_unknown_base_lists_what_is_available(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TLIMAGE_REGISTRY_MIRRORS", "docker.io=mirror.invalid")
    (tmp_path / "image.py").write_text(
        "from tlimage import Image\nimage = Image('b', base_image='python:3.11-slim')\n"
    )
    with pytest.raises(TlimageError) as info:
        run(tmp_path / "image.py")
    # Not a local name: it is a registry image, pulled; Docker Hub is unreachable (no network,
    # or this nonexistent host named as its only endpoint) or lacks it.
    assert "image.py:2:1: python:3.11-slim: " in str(info.value)  # the call site, with a caret
    assert re.search(r"cannot reach|unknown image", str(info.value))
    assert (
        "available locally: debian-minimal, debian-systemd, debian-vnc, ubuntu-minimal"
        in info.value.render()
    )
    assert "debian-minimal carries Python 3" in (info.value.hint or "")


def test_registered_image_is_a_base_for_another(tmp_path: Path) -> None:
    path = project(tmp_path)
    first, _, _ = run(path)
    (tmp_path / "child.py").write_text(
        "from tlimage import Image\nimage = Image('child', base_image='app').run('write /c 1')\n"
    )
    child, _, _ = run(tmp_path / "child.py")
    assert child.manifest.layers[: len(first.manifest.layers)] == first.manifest.layers
    assert child.manifest.config["env"] == first.manifest.config["env"]


def test_concurrent_builds_share_a_cache(tmp_path: Path) -> None:
    """8 processes build the same image into one empty cache at once: all succeed, one image."""
    path = project(tmp_path)
    code = (
        "import sys, json; from tlimage.builder import build_image;"
        "r = build_image(sys.argv[1], isolation='fake', project=sys.argv[2]);"
        "print(json.dumps([r.image_id, [la.digest for la in r.manifest.layers]]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert all(o == outs[0] for o in outs)


def test_copy_parents_keeps_context_folders(tmp_path: Path) -> None:
    from tlimage.cache.layer import apply_layer
    from tlimage.cache.store import BlobStore

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_text("x")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "y.txt").write_text("y")
    (tmp_path / "image.py").write_text(
        "from tlimage import Image\n"
        "image = Image('p', base_image='busybox').copy(['a/b/x.txt', 'c/y.txt'], '/dst/',"
        " options={'parents': True})\n"
    )
    result, _, _ = run(tmp_path / "image.py")
    layer = result.manifest.layers[-1]
    out = tmp_path / "out"
    with BlobStore().open(layer.digest, verify=True) as f:
        apply_layer(f, out)
    assert (out / "dst" / "a" / "b" / "x.txt").read_text() == "x"
    assert (out / "dst" / "c" / "y.txt").read_text() == "y"


def test_prune_keeps_what_registered_images_need(tmp_path: Path) -> None:
    from tlimage.builder.gc import prune
    from tlimage.cache.store import BlobStore

    result, _, _ = run(project(tmp_path))
    store = BlobStore()
    (tmp_path / "image.py").write_text(
        IMAGE.format(mode="x").replace("write /etc/first one", "write /etc/first two")
    )
    run(tmp_path / "image.py", registered_name="other")
    Registry().remove("default", "other")
    prune(None, keep_storage=0)
    for layer in result.manifest.layers:
        assert store.verify(layer.digest)
    assert store.has(f"xxh3:{result.image_id}")
    second, _, ex = run(project(tmp_path))
    assert second.image_id == result.image_id and ex.runs == []


def test_copy_from_a_stage_sees_a_changed_file_in_that_stage(tmp_path: Path) -> None:
    """COPY --from=<stage> is keyed by what the stage built, not only by how it is defined."""
    (tmp_path / "v.txt").write_text("one")
    (tmp_path / "Dockerfile").write_text(
        "FROM busybox AS a\nCOPY v.txt /v\n\nFROM busybox\nCOPY --from=a /v /copied\n"
    )
    first, _, _ = run(tmp_path / "Dockerfile")
    (tmp_path / "v.txt").write_text("two")
    second, events, _ = run(tmp_path / "Dockerfile")
    assert second.image_id != first.image_id
    final_copy = [e for e in events if e["event"] in ("step_cached", "step_done")
                  and e["stage"] == "stage-1" and e["index"] == 1]  # fmt: skip
    assert [e["event"] for e in final_copy] == ["step_done"]
