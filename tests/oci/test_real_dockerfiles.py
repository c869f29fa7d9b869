"""Real-world Dockerfiles (fixtures/real/<case>/) build end to end from images pulled out of a
local registry through a docker.io mirror, and run as sandboxes.

One registry serves the module: tlimage-built bases are pushed into it under Docker Hub names
(`library/debian:bookworm`, `library/python:3.12-slim`, `library/busybox:1.36`, …), as a site
mirror of Docker Hub would hold them. Every case then builds on one "fresh machine" (its own
cache and state, shared between cases so pulled bases and cache mounts are reused) with the
namespace backend; build steps reach the Debian archive and PyPI. The check is `docker run
IMAGE`: the image's ENTRYPOINT + CMD run in a sandbox, and its stdout must equal expected.txt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.oci.conftest import REGISTRY_BIN, Reg, _config, free_port, need

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
]

REAL = Path(__file__).resolve().parents[2] / "fixtures" / "real"
CASES = sorted(p.name for p in REAL.iterdir() if (p / "Dockerfile").is_file())

# Docker Hub name -> the Dockerfile of the tlimage-built image pushed under it. The config
# lines stand in for what the real images set (the python image's PYTHON_VERSION and LANG).
SEEDS = {
    "library/debian:bookworm": "FROM debian-minimal\n",
    "library/debian:bookworm-slim": "FROM debian-minimal\n",
    "library/python:3.12-slim": "FROM debian-minimal\nENV PYTHON_VERSION=3.12 LANG=C.UTF-8\n"
                                'CMD ["python3"]\n',
    "library/busybox:1.36": 'FROM busybox\nCMD ["sh"]\n',
    # As the retired python:<ver>-onbuild images: triggers run in the child's build.
    "library/python:3.12-onbuild": "FROM debian-minimal\nRUN mkdir -p /usr/src/app\n"
                                   "WORKDIR /usr/src/app\n"
                                   "ONBUILD COPY requirements.txt /usr/src/app/\n"
                                   "ONBUILD RUN pip install --no-cache-dir -r requirements.txt\n"
                                   "ONBUILD COPY . /usr/src/app\n",
}  # fmt: skip


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """(registry, environment of the fresh machine) with the seeds pushed."""
    need(REGISTRY_BIN)
    from tlimage.builder import build_image
    from tlimage.builder.images import local_image
    from tlimage.cache.store import BlobStore, default_cache_root
    from tlimage.oci.client import RegistryConfig
    from tlimage.oci.push import push

    shared = Path(os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE") or default_cache_root())
    if shutil.which("mmdebstrap") is None and not any(
            (shared / "executor-v1" / "bases").glob("debian-minimal-*")):  # fmt: skip
        pytest.skip("debian-minimal is not built and mmdebstrap is not installed")
    tmp = tmp_path_factory.mktemp("real")
    port = free_port()
    root = tmp / "registry"
    root.mkdir()
    reg = Reg(f"127.0.0.1:{port}", root, None, _config(root, port))
    reg.start()
    try:
        conf = RegistryConfig(insecure=(reg.host,), certs_dirs=())
        digests = {}
        for i, (name, dockerfile) in enumerate(SEEDS.items()):
            d = tmp / f"seed{i}"
            d.mkdir()
            (d / "Dockerfile").write_text(dockerfile)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("TLIMAGE_STATE_DIR", str(tmp / "seed-state"))
                seed = build_image(d / "Dockerfile", cache_dir=shared, isolation="namespace")
                stats = push(BlobStore(shared), local_image(seed.record), f"{reg.host}/{name}",
                             config=conf, cache_root=tmp / "hints")  # fmt: skip
                digests[name] = stats.digest
        env = {"TLIMAGE_CACHE_DIR": str(tmp / "fresh" / "cache"),
               "TLIMAGE_STATE_DIR": str(tmp / "fresh" / "state"),
               "TLIMAGE_REGISTRY_MIRRORS": f"docker.io={reg.host}",
               "TLIMAGE_INSECURE_REGISTRIES": reg.host, "SEED_DIGESTS": digests}  # fmt: skip
        yield reg, env
    finally:
        reg.stop()


def _machine(env: dict, monkeypatch) -> None:
    for k, v in env.items():
        if isinstance(v, str):
            monkeypatch.setenv(k, v)


@pytest.mark.parametrize("case", CASES)
def test_real_dockerfile_builds_and_runs(case, mirror, tmp_path, monkeypatch):
    from tlimage.builder import build_image
    from tlimage.oci.client import RegistryConfig
    from tlimage.runtime import Sandbox

    reg, env = mirror
    _machine(env, monkeypatch)
    ctx = tmp_path / case
    shutil.copytree(REAL / case, ctx, symlinks=True)
    events: list[dict] = []
    name = f"real-{case}"
    result = build_image(ctx / "Dockerfile", isolation="namespace", registered_name=name,
                         emit=events.append, registry_config=RegistryConfig.from_env())  # fmt: skip
    # The base came out of the local registry (through the mirror), pinned by digest.
    assert "@sha256:" in result.manifest.base, result.manifest.base
    cfg = result.manifest.config
    argv = list(cfg.get("entrypoint") or []) + list(cfg.get("cmd") or [])
    assert argv, f"{case}: the image has neither ENTRYPOINT nor CMD"
    sb = Sandbox.create(name, backend="namespace")
    try:
        got = sb.exec(*argv, timeout=120)
    finally:
        sb.terminate()
    logs = "".join(e.get("data", "") for e in events if e["event"] == "build_log")
    assert got.exit_code == 0, (got.stdout + got.stderr).decode(errors="replace") + logs[-3000:]
    assert got.stdout.decode() == (ctx / "expected.txt").read_text(), got.stderr.decode()

    # The same build again (no --pull): the pinned base resolution and every step come from
    # the cache; nothing runs and the image is the same.
    again: list[dict] = []
    second = build_image(ctx / "Dockerfile", isolation="namespace", registered_name=name,
                         emit=again.append, registry_config=RegistryConfig.from_env())  # fmt: skip
    ran = [e["step"] for e in again if e["event"] == "step_done" and not e.get("config_only")]
    assert ran == [], ran
    assert [la.diff_id for la in second.manifest.layers] == \
        [la.diff_id for la in result.manifest.layers]  # fmt: skip


def test_tag_and_digest_pinned_base(mirror, tmp_path, monkeypatch):
    """`FROM python:3.12-slim@sha256:…` as Renovate pins bases: the digest wins over the tag and
    is what the image records; a digest the registry does not hold is a clear error naming
    the reference and the Dockerfile line."""
    from tlimage.builder import build_image
    from tlimage.errors import TlimageError
    from tlimage.oci.client import RegistryConfig

    reg, env = mirror
    _machine(env, monkeypatch)
    digest = env["SEED_DIGESTS"]["library/python:3.12-slim"]
    (tmp_path / "Dockerfile").write_text(
        f"FROM python:3.12-slim@{digest}\nRUN python3 -c 'print(6 * 7)' > /answer\n"
        'CMD ["cat", "/answer"]\n')  # fmt: skip
    result = build_image(tmp_path / "Dockerfile", isolation="namespace",
                         registry_config=RegistryConfig.from_env())  # fmt: skip
    assert result.manifest.base.endswith(f"library/python@{digest}"), result.manifest.base
    assert "PYTHON_VERSION=3.12" in result.manifest.config["env"]

    missing = "sha256:" + "0" * 64
    (tmp_path / "Dockerfile").write_text(f"FROM scratch AS x\n\nFROM debian:bookworm@{missing}\n")
    with pytest.raises(TlimageError) as err:
        build_image(tmp_path / "Dockerfile", isolation="namespace",
                    registry_config=RegistryConfig.from_env())  # fmt: skip
    text = str(err.value)
    assert "debian" in text and missing[:19] in text, text
    assert "Dockerfile:3" in text, text


def test_cli_target_stage_with_build_arg(mirror, tmp_path):
    """Through the CLI as a user would: `--target builder --build-arg PYTHON_TAG=…` builds only
    the wheel-house stage of fixtures/real/python-wheels, on the base the argument names (the
    onbuild variant, whose triggers show it was used)."""
    import json
    import subprocess
    import sys

    reg, env = mirror
    full = {**os.environ, **{k: v for k, v in env.items() if isinstance(v, str)}}
    ctx = tmp_path / "python-wheels"
    shutil.copytree(REAL / "python-wheels", ctx)

    def tl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=ctx, env=full,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    out = tl("sbx", "image", "create", "Dockerfile", "-n", "wheels:builder", "--target",
             "builder", "--build-arg", "PYTHON_TAG=3.12-onbuild", "--isolation", "namespace")  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    desc = json.loads(tl("sbx", "image", "describe", "wheels:builder").stdout)
    assert "library/python@sha256:" in desc["base"], desc["base"]
    assert desc["config"]["workdir"] == "/src"
    new = tl("sbx", "new", "--image", "wheels:builder")
    assert new.returncode == 0, new.stderr
    sid = new.stdout.strip().split()[-1]
    try:
        got = tl("sbx", "exec", sid, "cat", "/wheels/INDEX")
        assert got.returncode == 0, got.stderr
        assert [w.split("-")[0] for w in got.stdout.split()] == ["INDEX", "greeter", "six"]
        # The argument picked the onbuild base: its triggers copied the project in.
        assert tl("sbx", "exec", sid, "test", "-f", "/usr/src/app/pyproject.toml").returncode == 0
        # The runtime stage was not built: no greeter installed in this image.
        assert tl("sbx", "exec", sid, "sh", "-c", "command -v greeter").returncode != 0
    finally:
        tl("sbx", "terminate", sid)
