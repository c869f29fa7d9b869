"""--cache-to / --cache-from through a real registry: a second machine (a fresh cache folder and
state) reports every step CACHED and fetches only layers; a changed file rebuilds exactly the
steps after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.oci.conftest import skopeo_copy, umoci_image
from tlimage.builder import build_image
from tlimage.executor.fake import FakeExecutor
from tlimage.oci.client import RegistryConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root"),
]

DOCKERFILE = """\
FROM {base}
RUN write /etc/step1 one
COPY a.txt /a.txt
RUN write /etc/step2 two
COPY b.txt /b.txt
RUN write /etc/step3 three
"""


def machine(tmp_path: Path, name: str, monkeypatch) -> None:
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(tmp_path / name / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(tmp_path / name / "state"))


def build(ctx: Path, reg, **kw):
    events: list[dict] = []
    ex = FakeExecutor()
    cfg = RegistryConfig(insecure=(reg.host,), certs_dirs=(), backoff=0.05)
    result = build_image(ctx / "Dockerfile", emit=events.append, executor=ex,
                         registry_config=cfg, **kw)  # fmt: skip
    return result, events, ex


def test_second_machine_reuses_the_registry_cache(registry, tmp_path, monkeypatch):
    layout = umoci_image(tmp_path / "layout", "v1", [{"etc/": "", "etc/os-release": b"ID=x\n"}])
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/base/img:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base=f"{registry.host}/base/img:v1"))
    (ctx / "a.txt").write_text("a\n")
    (ctx / "b.txt").write_text("b\n")
    cache_ref = f"{registry.host}/app/cache:main"

    machine(tmp_path, "one", monkeypatch)
    first, _, ex1 = build(ctx, registry, cache_to=(cache_ref,))
    assert first.executed_steps == 5 and len(ex1.runs) == 3

    machine(tmp_path, "two", monkeypatch)
    second, events, ex2 = build(ctx, registry, cache_from=(cache_ref,))
    assert second.executed_steps == 0 and second.cached_steps == 5 and ex2.runs == []
    assert second.image_id == first.image_id

    (ctx / "b.txt").write_text("changed\n")
    machine(tmp_path, "three", monkeypatch)
    third, events, ex3 = build(ctx, registry, cache_from=(cache_ref,))
    ran = [e["index"] for e in events if e["event"] == "step_done"]
    assert ran == [4, 5] and len(ex3.runs) == 1

    # A cache reference that does not exist is reported and skipped.
    machine(tmp_path, "four", monkeypatch)
    fourth, events, _ = build(ctx, registry, cache_from=(f"{registry.host}/app/cache:nope",))
    assert any("not used" in e.get("message", "") for e in events if e["event"] == "status")
    assert fourth.executed_steps == 5


def _never_built(monkeypatch) -> None:
    """On this machine a seed base's tree must not be built (no mmdebstrap, no busybox tree)."""
    from tlimage.executor import bases

    def refuse(*_a, **_k):
        raise AssertionError("the base's tree was built although --cache-from has its layer")

    monkeypatch.setattr(bases, "build_deb_base", refuse)
    monkeypatch.setattr(bases, "build_busybox_base", refuse)


def test_seed_base_layer_travels_in_the_registry_cache(registry, tmp_path, monkeypatch):
    """--cache-to exports the seed base's layer under its recipe key: a fresh machine with
    --cache-from takes the base from the registry instead of building its tree."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base="busybox"))
    (ctx / "a.txt").write_text("a\n")
    (ctx / "b.txt").write_text("b\n")
    cache_ref = f"{registry.host}/app/cache:busybox"

    machine(tmp_path, "one", monkeypatch)
    first, _, _ = build(ctx, registry, cache_to=(cache_ref,))
    assert first.executed_steps == 5

    machine(tmp_path, "two", monkeypatch)
    with monkeypatch.context() as m:
        _never_built(m)
        second, events, ex2 = build(ctx, registry, cache_from=(cache_ref,))
    assert second.executed_steps == 0 and ex2.runs == []
    assert second.image_id == first.image_id
    assert any("busybox fetched from the remote cache" in e.get("message", "")
               for e in events if e["event"] == "status")  # fmt: skip
    assert not list((tmp_path / "two" / "cache").rglob("busybox-*"))  # no tree was made

    # Without --cache-from the fresh machine builds the base itself, as before.
    machine(tmp_path, "three", monkeypatch)
    with monkeypatch.context() as m:
        _never_built(m)
        with pytest.raises(AssertionError, match="tree was built"):
            build(ctx, registry)


def test_debian_base_needs_no_mmdebstrap_on_a_fresh_machine(registry, tmp_path, monkeypatch):
    """The same for a Debian seed base. Its tree is stood in for by a small one on the first
    machine (building it needs the Debian archive; what is under test is that the second
    machine, a fresh cache folder, never runs the recipe)."""
    from tlimage.executor import bases

    def small_tree(dest, spec, info):
        (dest / "etc").mkdir(parents=True)
        (dest / "etc" / "os-release").write_text(f"ID=debian\nVERSION_CODENAME={info['suite']}\n")

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base="debian-minimal"))
    (ctx / "a.txt").write_text("a\n")
    (ctx / "b.txt").write_text("b\n")
    cache_ref = f"{registry.host}/app/cache:debian"

    machine(tmp_path, "one", monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(bases, "build_deb_base", small_tree)
        first, _, _ = build(ctx, registry, cache_to=(cache_ref,))
    machine(tmp_path, "two", monkeypatch)
    with monkeypatch.context() as m:
        _never_built(m)
        second, _, ex2 = build(ctx, registry, cache_from=(cache_ref,))
    assert second.executed_steps == 0 and ex2.runs == []
    assert second.image_id == first.image_id
