"""End to end through the CLI and real sandboxes: a tlimage-built image is pushed to a local
registry; on a second "machine" (fresh cache and state) a Dockerfile `FROM debian:bookworm`
resolves through a docker.io mirror to it, builds in the namespace backend, and runs as a
sandbox; export/import round-trip through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
    pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                       reason="busybox-static is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

SEED = """\
from tlimage import Image
image = (Image("seed", base_image="busybox")
         .run("mkdir -p /etc && echo 'PRETTY_NAME=\\"seed from tlimage\\"' > /etc/os-release")
         .env("SEED", "1"))
"""

DOCKERFILE = """\
FROM debian:bookworm
RUN echo "built on $(cat /etc/os-release)" > /built.txt
ENV APP=on
CMD ["cat", "/built.txt"]
"""


def tl(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip


def test_build_from_mirrored_registry_image_and_run_sandbox(registry, tmp_path):
    a = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "a/cache"),
         "TLIMAGE_STATE_DIR": str(tmp_path / "a/state")}  # fmt: skip
    (tmp_path / "seed.py").write_text(SEED)
    out = tl("sbx", "image", "create", "seed.py", "--isolation", "namespace",
             "--push", f"{registry.host}/library/debian:bookworm", "--compression", "gzip",
             "--insecure-registry", registry.host, cwd=tmp_path, env=a)  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/library/debian:bookworm"],
                         capture_output=True, check=True, text=True).stdout  # fmt: skip
    assert {la["mediaType"] for la in json.loads(raw)["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"}  # fmt: skip

    b = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "b/cache"),
         "TLIMAGE_STATE_DIR": str(tmp_path / "b/state"),
         "TLIMAGE_REGISTRY_MIRRORS": f"docker.io={registry.host}",
         "TLIMAGE_INSECURE_REGISTRIES": registry.host}  # fmt: skip
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    out = tl("sbx", "image", "create", "Dockerfile", "-n", "app", "--isolation", "namespace",
             "--json", cwd=ctx, env=b)  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert any(e["event"] == "pull_layer" for e in events)
    desc = json.loads(tl("sbx", "image", "describe", "app", cwd=ctx, env=b).stdout)
    assert desc["base"].startswith(f"{registry.host}/library/debian@sha256:") or \
        desc["base"].startswith("docker.io/library/debian@sha256:")  # fmt: skip
    assert "SEED=1" in desc["config"]["env"] and "APP=on" in desc["config"]["env"]

    new = tl("sbx", "new", "--image", "app", cwd=ctx, env=b)
    assert new.returncode == 0, new.stderr
    sid = new.stdout.strip().split()[-1]
    try:
        got = tl("sbx", "exec", sid, "cat", "/built.txt", cwd=ctx, env=b)
        assert got.returncode == 0, got.stderr
        assert got.stdout == 'built on PRETTY_NAME="seed from tlimage"\n'
    finally:
        tl("sbx", "terminate", sid, cwd=ctx, env=b)

    # A sandbox straight from a registry image (no registered name matches): pulled, run.
    new = tl("sbx", "new", "--image", "debian:bookworm", cwd=ctx, env=b)
    assert new.returncode == 0, new.stderr
    sid = new.stdout.strip().split()[-1]
    try:
        got = tl("sbx", "exec", sid, "cat", "/etc/os-release", cwd=ctx, env=b)
        assert got.stdout == 'PRETTY_NAME="seed from tlimage"\n', got.stderr
    finally:
        tl("sbx", "terminate", sid, cwd=ctx, env=b)

    # Export / import through the CLI: a third machine gets the same image from the archive.
    out = tl("sbx", "image", "export", "app", "-o", str(tmp_path / "app.tar"), "--format",
             "docker", cwd=ctx, env=b)  # fmt: skip
    assert out.returncode == 0, out.stderr
    c = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "c/cache"),
         "TLIMAGE_STATE_DIR": str(tmp_path / "c/state")}  # fmt: skip
    out = tl("sbx", "image", "import", str(tmp_path / "app.tar"), "-n", "app:copy", cwd=ctx,
             env=c)  # fmt: skip
    assert out.returncode == 0, out.stderr
    copy = json.loads(tl("sbx", "image", "describe", "app:copy", cwd=ctx, env=c).stdout)
    assert [la["diff_id"] for la in copy["layers"]] == [la["diff_id"] for la in desc["layers"]]
    assert copy["config"]["cmd"] == ["cat", "/built.txt"]


MULTI = """\
# syntax=docker/dockerfile:1
FROM golang:1.22 AS build
WORKDIR /src
COPY main.txt .
RUN mkdir -p /out && cp main.txt /out/app && echo built >> /out/app
FROM alpine:3.19
COPY --from=build /out/app /usr/local/bin/app
RUN --mount=type=bind,from=golang:1.22,source=/etc/os-release,target=/mnt/os cat /mnt/os > /base-os
CMD ["cat", "/usr/local/bin/app"]
"""


def test_multi_stage_dockerfile_with_registry_images(registry, tmp_path, monkeypatch):
    """A multi-stage Dockerfile as real projects write it: two Docker Hub names (through the
    mirror), COPY --from a stage, RUN --mount from an image; steps run in namespace sandboxes."""
    from tlimage.builder import build_image
    from tlimage.builder.images import local_image
    from tlimage.cache.store import BlobStore
    from tlimage.oci.client import RegistryConfig
    from tlimage.oci.push import push

    (tmp_path / "seed.py").write_text(SEED)
    seed = build_image(tmp_path / "seed.py", isolation="namespace")
    conf = RegistryConfig(insecure=(registry.host,), certs_dirs=())
    for name in ("library/golang:1.22", "library/alpine:3.19"):
        push(BlobStore(), local_image(seed.record), f"{registry.host}/{name}", config=conf)

    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(tmp_path / "fresh" / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(tmp_path / "fresh" / "state"))
    monkeypatch.setenv("TLIMAGE_REGISTRY_MIRRORS", f"docker.io={registry.host}")
    monkeypatch.setenv("TLIMAGE_INSECURE_REGISTRIES", registry.host)
    ctx = tmp_path / "proj"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MULTI)
    (ctx / "main.txt").write_text("hello\n")
    result = build_image(ctx / "Dockerfile", isolation="namespace", registered_name="multi",
                         registry_config=RegistryConfig.from_env())  # fmt: skip
    from tlimage.runtime import Sandbox

    sb = Sandbox.create("multi", backend="namespace")
    try:
        assert sb.exec("cat", "/usr/local/bin/app").stdout == b"hello\nbuilt\n"
        assert b"seed from tlimage" in sb.exec("cat", "/base-os").stdout
    finally:
        sb.terminate()
    assert result.manifest.config["cmd"] == ["cat", "/usr/local/bin/app"]
