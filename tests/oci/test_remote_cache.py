"""--cache-to / --cache-from through a real registry: a second machine (a fresh cache folder and
state) reports every step CACHED and fetches only the layers of the image it builds; a changed
file rebuilds exactly the steps after it."""

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
    assert any("remote cache: fetched" in e.get("message", "")
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


MULTI_STAGE = """\
FROM busybox AS tools
RUN write /opt/tool1 one
COPY a.txt /opt/a.txt
RUN write /opt/tool2 two
FROM busybox AS unused
RUN write /opt/never read
FROM busybox
COPY --from=tools /opt/tool1 /usr/bin/tool1
COPY b.txt /b.txt
RUN write /etc/final yes
"""


def _multi_stage(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MULTI_STAGE)
    (ctx / "a.txt").write_text("a\n")
    (ctx / "b.txt").write_text("b\n")
    return ctx


def _stored(tmp_path: Path, name: str) -> set[str]:
    """The layer keys the cache of machine `name` holds."""
    from tlimage.cache.cache import LayerCache

    with LayerCache(tmp_path / name / "cache") as cache:
        return {r.key for r in cache.index.records()}


def _cached_keys(events: list[dict], stage: str) -> list[str]:
    return [e["key"] for e in events
            if e["event"] == "step_cached" and e["stage"] == stage and e["index"]]  # fmt: skip


def test_fresh_machine_fetches_only_the_final_images_layers(registry, tmp_path, monkeypatch):
    """A stage only read by a cached COPY --from is never downloaded (one nothing reads is not
    even walked): the fresh machine fetches the base and the final stage's layers, no more."""
    ctx = _multi_stage(tmp_path)
    cache_ref = f"{registry.host}/app/cache:multi"
    machine(tmp_path, "one", monkeypatch)
    first, _, _ = build(ctx, registry, cache_to=(cache_ref,))

    machine(tmp_path, "two", monkeypatch)
    second, events, ex2 = build(ctx, registry, cache_from=(cache_ref,))
    assert second.executed_steps == 0 and ex2.runs == [] and second.cached_steps == 6
    assert second.image_id == first.image_id
    stored = _stored(tmp_path, "two")
    assert len(_cached_keys(events, "tools")) == 3
    assert not stored & set(_cached_keys(events, "tools")), "stage tools was downloaded"
    assert not any(e.get("stage") == "unused" for e in events)
    # The final image: the base and three layers; every one of them is stored and unpacks.
    assert len(second.manifest.layers) == 4
    assert set(_cached_keys(events, "stage-2")) <= stored
    fetched = [e["message"] for e in events if "remote cache: fetched" in e.get("message", "")]
    assert fetched == [fetched[0]] and "fetched 4 layers" in fetched[0], fetched

    # A changed file on a third machine: the final stage's COPY and RUN run on top of layers
    # fetched then; the tools stage is still not downloaded.
    (ctx / "b.txt").write_text("changed\n")
    machine(tmp_path, "three", monkeypatch)
    third, events, ex3 = build(ctx, registry, cache_from=(cache_ref,))
    ran = [(e["stage"], e["index"]) for e in events if e["event"] == "step_done"]
    assert ran == [("stage-2", 2), ("stage-2", 3)] and len(ex3.runs) == 1
    assert not _stored(tmp_path, "three") & set(_cached_keys(events, "tools"))


def test_cache_to_carries_steps_never_fetched(registry, tmp_path, monkeypatch):
    """A machine that built from --cache-from and exports with --cache-to writes every step of
    the build, the ones it never downloaded included: mounted from the first cache on the same
    registry, streamed across to another registry host."""
    ctx = _multi_stage(tmp_path)
    first_ref = f"{registry.host}/app/cache:multi"
    same_host = f"{registry.host}/other/cache:copy"
    port = registry.host.rsplit(":", 1)[1]
    other_host = f"localhost:{port}/third/cache:copy"  # another registry name: no mount
    machine(tmp_path, "one", monkeypatch)
    first, _, _ = build(ctx, registry, cache_to=(first_ref,))

    machine(tmp_path, "two", monkeypatch)
    events: list[dict] = []
    cfg = RegistryConfig(insecure=(registry.host, f"localhost:{port}"), certs_dirs=(),
                         backoff=0.05)  # fmt: skip
    build_image(ctx / "Dockerfile", emit=events.append, executor=FakeExecutor(),
                registry_config=cfg, cache_from=(first_ref,),
                cache_to=(same_host, other_host))  # fmt: skip
    exported = [e["message"] for e in events if "cache exported" in e.get("message", "")]
    assert len(exported) == 2
    # Same registry: every layer mounted or there already; only the new map's config is sent.
    assert ": 1 blobs uploaded" in exported[0] and "0 mounted" not in exported[0], exported
    assert ": 8 blobs uploaded" in exported[1], exported  # another registry: streamed across

    for n, ref in enumerate((same_host, other_host)):
        machine(tmp_path, f"fresh{n}", monkeypatch)
        events = []
        result = build_image(ctx / "Dockerfile", emit=events.append, executor=FakeExecutor(),
                             registry_config=cfg, cache_from=(ref,))  # fmt: skip
        assert result.executed_steps == 0 and result.image_id == first.image_id, ref
        # The tools stage's layers were carried too: a build of that stage alone is CACHED.
        tools = build_image(ctx / "Dockerfile", emit=events.append, executor=FakeExecutor(),
                            registry_config=cfg, cache_from=(ref,),
                            frontend_options={"target": "tools"})  # fmt: skip
        assert tools.executed_steps == 0, ref


def test_a_cached_layer_lost_from_the_registry_is_a_clear_error(registry, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """The step was CACHED on the map's word; when its layer then cannot be fetched, the build
    stops naming the step that needed it and how to go on (nothing is registered)."""
    import shutil

    from tlimage.errors import TlimageError

    ctx = _multi_stage(tmp_path)
    cache_ref = f"{registry.host}/app/cache:lost"
    machine(tmp_path, "one", monkeypatch)
    first, _, _ = build(ctx, registry, cache_to=(cache_ref,))
    from tlimage.oci.cache import RemoteCache
    from tlimage.oci.client import RegistryClient

    cfg = RegistryConfig(insecure=(registry.host,), certs_dirs=(), backoff=0.05, retries=1)
    with RegistryClient(cfg) as client:
        remote = RemoteCache([cache_ref], client)
        small = {
            entry.layer
            for entry, _ep, _l in remote.entries.values()
            if not entry.empty and entry.size < 1000
        }  # the steps' layers, not the base's
    blobs = registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    registry.stop()
    for digest in small:
        hexd = digest.split(":")[1]
        shutil.rmtree(blobs / hexd[:2] / hexd)
    registry.start()

    machine(tmp_path, "two", monkeypatch)
    events: list[dict] = []
    with pytest.raises(TlimageError) as err:
        build_image(ctx / "Dockerfile", emit=events.append, executor=FakeExecutor(),
                    registry_config=cfg, cache_from=(cache_ref,))  # fmt: skip
    assert "from the remote cache, which could not be fetched" in err.value.message
    assert "--no-cache" in (err.value.hint or "")
    assert not any(e["event"] == "image_registered" for e in events)


def test_a_builder_stages_registry_base_is_not_pulled(registry, tmp_path, monkeypatch):
    """FROM <registry image> AS tools, all its steps in the cache, read only by a cached COPY
    --from: the fresh machine resolves the image (manifest and config, for the keys) but never
    downloads its layers; the resolution is kept, so the next build asks no registry."""
    from tlimage.oci.pull import layer_key

    big = umoci_image(tmp_path / "big", "v1", [{"opt/": "", "opt/sdk": b"x" * 200_000}])
    skopeo_copy(f"oci:{big}:v1", f"docker://{registry.host}/sdk/big:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"""\
FROM {registry.host}/sdk/big:v1 AS tools
RUN write /opt/tool built
FROM busybox
COPY --from=tools /opt/tool /usr/bin/tool
""")
    cache_ref = f"{registry.host}/app/cache:sdk"
    machine(tmp_path, "one", monkeypatch)
    first, events, _ = build(ctx, registry, cache_to=(cache_ref,))
    assert any(e["event"] == "pull_started" for e in events)

    machine(tmp_path, "two", monkeypatch)
    second, events, ex2 = build(ctx, registry, cache_from=(cache_ref,))
    assert second.executed_steps == 0 and ex2.runs == [] and second.image_id == first.image_id
    assert not any(e["event"] in ("pull_started", "pull_layer") for e in events), events
    blobs = [d["digest"] for d in _manifest_layers(registry, "sdk/big", "v1")]
    with_cache = _stored(tmp_path, "two")
    assert not {layer_key(b) for b in blobs} & with_cache

    # The resolution was recorded: with the registry gone it is answered offline. A build that
    # must run a step on the image then (no cache) says which step needed which layers.
    from tlimage.cache.cache import LayerCache
    from tlimage.errors import TlimageError
    from tlimage.oci.pull import resolve

    registry.stop()
    with LayerCache(tmp_path / "two" / "cache") as cache:
        res = resolve(f"{registry.host}/sdk/big:v1", cache)
    assert res.offline and [d["digest"] for d in res.layers] == blobs
    with pytest.raises(TlimageError) as err:
        build(ctx, registry)
    assert "Dockerfile:2: step 'RUN write /opt/tool built' needs 1 layer of image" in str(err.value)
    registry.start()


def _manifest_layers(registry, repo: str, tag: str) -> list[dict]:
    import json
    import urllib.request

    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req) as resp:  # noqa: S310 - the test's own registry
        return json.loads(resp.read())["layers"]
