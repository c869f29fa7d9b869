"""Builds whose bases come from a real registry (docker-registry, images made by umoci and put
there by skopeo): FROM, COPY --from=<image>, the digest pinned in keys and records, offline
reuse, --pull and a moved tag, mirrors for docker.io, image config inheritance. Steps run in the
fake executor here; tests/oci/test_e2e.py runs them in real sandboxes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.oci.conftest import one_file_tar, put_image, sha256, skopeo_copy, umoci_image
from tlimage.builder import build_image
from tlimage.errors import TlimageError
from tlimage.executor.fake import FakeExecutor
from tlimage.oci.client import RegistryConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root"),
]

BASE = [{"etc/": "", "etc/os-release": b"ID=base\n", "opt/": "", "opt/tool": b"v1\n"}]
CONFIG = ["--config.env=FOO=bar", "--config.workingdir=/opt", "--config.cmd=/opt/tool",
          "--config.user=1000", "--config.label=org.example=yes", "--config.exposedports=8080/tcp",
          "--config.stopsignal=SIGINT"]  # fmt: skip


@pytest.fixture
def base(registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", BASE, CONFIG)
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/base/img:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    return layout


def build(path: Path, reg, **kw):
    events: list[dict] = []
    cfg = RegistryConfig(insecure=(reg.host,), certs_dirs=(), backoff=0.05)
    result = build_image(path, emit=events.append, executor=FakeExecutor(),
                         registry_config=kw.pop("registry_config", cfg), **kw)  # fmt: skip
    return result, events


def dockerfile(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ctx").mkdir(exist_ok=True)
    p = tmp_path / "ctx" / "Dockerfile"
    p.write_text(text)
    return p


def test_from_registry_image_inherits_config_and_pins_digest(registry, base, tmp_path):
    df = dockerfile(tmp_path, f"FROM {registry.host}/base/img:v1\nRUN write /opt/built yes\n")
    result, events = build(df, registry)
    cfg = result.manifest.config
    assert "FOO=bar" in cfg["env"] and cfg["workdir"] == "/opt" and cfg["user"] == "1000"
    assert cfg["cmd"] == ["/opt/tool"] and cfg["labels"] == {"org.example": "yes"}
    assert cfg["exposed_ports"] == ["8080/tcp"] and cfg["stopsignal"] == "SIGINT"
    assert len(result.manifest.layers) == 2
    assert result.manifest.base.startswith(f"{registry.host}/base/img@sha256:")
    assert result.record.manifest.base == result.manifest.base
    assert any(e["event"] == "pull_layer" for e in events)

    # Again, with the registry gone: the recorded resolution is used offline; all cached.
    registry.stop()
    again, events = build(df, registry)
    assert again.image_id == result.image_id and again.executed_steps == 0

    # The tag moves. Without --pull nothing changes; with --pull the move is reported and the
    # steps after FROM run again.
    registry.start()
    umoci_image(base, "v1", [{"opt/tool": b"v2\n"}])
    skopeo_copy(f"oci:{base}:v1", f"docker://{registry.host}/base/img:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    same, _ = build(df, registry)
    assert same.image_id == result.image_id
    moved, events = build(df, registry, pull=True, explain=True)
    assert moved.executed_steps == 1 and moved.image_id != result.image_id
    [why] = [e["reason"] for e in events if e["event"] == "explain" and "moved" in e["reason"]]
    old, new = result.manifest.base.split("@")[1], moved.manifest.base.split("@")[1]
    assert why == f"base {registry.host}/base/img:v1 moved: {old} -> {new}"


def test_mirror_serves_docker_hub_names_and_copy_from_image(registry, base, tmp_path, monkeypatch):
    skopeo_copy(f"oci:{base}:v1", f"docker://{registry.host}/library/debian:bookworm",
                *registry.skopeo_flags("dest"))  # fmt: skip
    monkeypatch.setenv("TLIMAGE_REGISTRY_MIRRORS", f"docker.io={registry.host}")
    monkeypatch.setenv("TLIMAGE_INSECURE_REGISTRIES", registry.host)
    df = dockerfile(
        tmp_path,
        "FROM debian:bookworm AS one\nRUN write /one 1\n"
        "FROM scratch\nCOPY --from=debian:bookworm /etc/os-release /copied\n"
        "COPY --from=one /one /one\n",
    )
    result, _ = build(df, registry, registry_config=RegistryConfig.from_env())
    assert result.manifest.base == "scratch"
    assert len(result.manifest.layers) == 2


def test_unknown_tag_names_the_dockerfile_line(registry, base, tmp_path):
    df = dockerfile(tmp_path, f"FROM busybox\nFROM {registry.host}/base/img:nope\n")
    with pytest.raises(TlimageError) as e:
        build(df, registry)
    assert "Dockerfile:2" in str(e.value) and "unknown image or tag 'nope'" in str(e.value)


def test_dsl_base_image_from_registry(registry, base, tmp_path):
    (tmp_path / "image.py").write_text(
        "from tlimage import Image\n"
        f"image = Image('app', base_image='{registry.host}/base/img:v1').run('write /x 1')\n"
    )
    result, _ = build(tmp_path / "image.py", registry)
    assert result.manifest.config["workdir"] == "/opt"


def test_pulled_base_env_workdir_and_onbuild_reach_the_dockerfile(registry, tmp_path):
    """A base pushed with ONBUILD triggers and its own PATH/WORKDIR: the child Dockerfile's word
    expansion sees them, the triggers run at its FROM, and are not carried on."""
    from tlimage.builder.images import local_image
    from tlimage.cache.cache import LayerCache
    from tlimage.oci.push import push

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Dockerfile").write_text(
        "FROM busybox\nENV PATH=/opt/bin:$PATH\nWORKDIR /srv\nONBUILD RUN write /srv/trig yes\n"
    )
    cfg = RegistryConfig(insecure=(registry.host,), certs_dirs=(), backoff=0.05)
    parent = build_image(
        tmp_path / "b" / "Dockerfile", executor=FakeExecutor(), registered_name="parent"
    )
    assert parent.manifest.config["onbuild"] == ["RUN write /srv/trig yes"]
    with LayerCache() as cache:
        push(cache.store, local_image(parent.record), f"{registry.host}/p/parent:1", config=cfg)
    df = dockerfile(tmp_path, f"FROM {registry.host}/p/parent:1\nENV PATH=/x:$PATH\nWORKDIR app\n")
    result, _ = build(df, registry)
    env = dict(e.split("=", 1) for e in result.manifest.config["env"])
    assert env["PATH"].startswith("/x:/opt/bin:")
    assert result.manifest.config["workdir"] == "/srv/app"
    assert "onbuild" not in result.manifest.config
    assert result.executed_steps == 2  # the trigger's RUN, and WORKDIR


def test_scratch_and_seed_bases_never_reach_a_registry(tmp_path, monkeypatch):
    """FROM scratch / a seed base: no registry is asked (a mirror here records any request)."""
    import http.server
    import threading

    from tests.oci.conftest import free_port

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # noqa: ANN002
            pass

        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TLIMAGE_REGISTRY_MIRRORS", f"docker.io=127.0.0.1:{port}")
        monkeypatch.setenv("TLIMAGE_INSECURE_REGISTRIES", f"127.0.0.1:{port}")
        df = dockerfile(
            tmp_path, "FROM scratch AS a\nCOPY x /x\nFROM busybox\nCOPY --from=a /x /y\n"
        )
        (tmp_path / "ctx" / "x").write_text("x")
        build_image(df, executor=FakeExecutor(), registry_config=RegistryConfig.from_env())
    finally:
        server.shutdown()
        server.server_close()
    assert seen == []


@pytest.mark.parametrize("name, text, line, shown", [
    ("Dockerfile", "FROM busybox\nFROM {ref}\n", 2, "FROM {ref}"),
    ("Dockerfile", "FROM busybox\nCOPY --from={ref} /x /y\n", 2, "COPY --from={ref} /x /y"),
    ("Dockerfile", "FROM busybox\nRUN --mount=type=bind,from={ref},target=/m true\n", 2,
     "RUN --mount=type=bind,from={ref},target=/m true"),
    ("image.py", "from tlimage import Image\n\nimage = Image('a', base_image='{ref}').run('true')\n",
     3, "image = Image('a', base_image='{ref}').run('true')"),
    ("image.json", '{{\n  "type": "image",\n  "name": "a",\n  "base_image": "{ref}",\n'
     '  "operations": [{{"op": "RUN", "args": ["true"]}}]\n}}\n', 4, '  "base_image": "{ref}",'),
])  # fmt: skip
def test_a_bad_image_reference_names_the_line_that_asked_for_it(registry, tmp_path, name, text,
                                                                 line, shown):  # fmt: skip
    """FROM, COPY --from, RUN --mount=from, the DSL's and the JSON form's base_image: the error
    names the reference and points at the place (file:line:col, the line, a caret), also in
    the structured fields of a JSON `error` event."""
    ref = f"{registry.host}/no/such:nope"
    (tmp_path / "ctx").mkdir()
    path = tmp_path / "ctx" / name
    path.write_text(text.format(ref=ref))
    with pytest.raises(TlimageError) as e:
        build(path, registry)
    loc = e.value.location_fields()
    assert (loc["file"], loc["line"]) == (str(path), line) and loc["column"] >= 1
    lines = e.value.render().splitlines()
    assert lines[0].startswith(f"{path}:{line}:{loc['column']}: {ref}: unknown image or tag")
    assert lines[1] == f"{line:>4} | " + shown.format(ref=ref)
    assert lines[2].strip().startswith("^")


@pytest.mark.parametrize(
    "text",
    [
        "FROM {ref}\nRUN write /x 1\n",
        "FROM scratch\nCOPY --from={ref} /f.txt /y\n",
        "FROM {ref}\nWORKDIR /f.txt/sub\n",
        "FROM {ref}\nCOPY --chown=1:1 Dockerfile /f.txt\n",
    ],
)
def test_an_image_whose_config_lies_about_a_layer_names_image_and_line(registry, tmp_path, text):
    """A pulled image whose config's diff_id does not match its layer: the step that first
    unpacks it (a RUN on it, a COPY --from it) fails naming the image reference and the
    Dockerfile line."""
    import gzip

    from tlimage.oci.client import OCI_LAYER_GZIP

    blob = gzip.compress(one_file_tar("f.txt", b"abc"), mtime=0)
    ref = f"{registry.host}/bad/base:v1"
    put_image(registry, ref, blob, OCI_LAYER_GZIP, sha256(b"lie"))
    df = dockerfile(tmp_path, text.format(ref=ref))
    with pytest.raises(TlimageError) as e:
        build(df, registry)
    text = e.value.render()
    assert "Dockerfile:2" in text and f"of {ref} unpacks to" in text and sha256(b"lie") in text
