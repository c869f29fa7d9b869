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
             "--push", f"{registry.host}/library/debian:bookworm", "--insecure-registry",
             registry.host, cwd=tmp_path, env=a)  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout

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
