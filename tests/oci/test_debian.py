"""One real distribution through the registry: the debian-minimal base (built by tlimage,
shared with the VM tests' cache) is pushed to a local registry as `library/python:3.11-slim`;
a fresh machine builds `FROM python:3.11-slim` through a docker.io mirror and runs Python in a
namespace sandbox step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tlimage.builder import build_image
from tlimage.oci.client import RegistryConfig

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
]


@pytest.fixture(scope="module")
def shared_cache() -> Path:
    from tlimage.cache.store import default_cache_root

    root = Path(os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE") or default_cache_root())
    if shutil.which("mmdebstrap") is None and not any(
            (root / "executor-v1" / "bases").glob("debian-minimal-*")):  # fmt: skip
        pytest.skip("debian-minimal is not built and mmdebstrap is not installed")
    return root


def test_from_python_slim_via_mirror_runs_python(registry, shared_cache, tmp_path, monkeypatch):
    from tlimage.builder.images import local_image
    from tlimage.cache.store import BlobStore
    from tlimage.oci.push import push

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "Dockerfile").write_text("FROM debian-minimal\nENV SEEDED=1\n")
    base = build_image(tmp_path / "base" / "Dockerfile", cache_dir=shared_cache,
                       isolation="namespace", registered_name="seedpy")  # fmt: skip
    conf = RegistryConfig(insecure=(registry.host,), certs_dirs=())
    push(BlobStore(shared_cache), local_image(base.record),
         f"{registry.host}/library/python:3.11-slim", config=conf,
         cache_root=tmp_path / "hints")  # fmt: skip

    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(tmp_path / "fresh" / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(tmp_path / "fresh" / "state"))
    monkeypatch.setenv("TLIMAGE_REGISTRY_MIRRORS", f"docker.io={registry.host}")
    monkeypatch.setenv("TLIMAGE_INSECURE_REGISTRIES", registry.host)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text(
        "FROM python:3.11-slim\nWORKDIR /app\n"
        'RUN python3 -c \'import sys; open("/app/v", "w").write(sys.version)\' && cat /app/v\n'
    )
    events: list[dict] = []
    result = build_image(
        tmp_path / "app" / "Dockerfile",
        isolation="namespace",
        emit=events.append,
        registry_config=RegistryConfig.from_env(),
    )
    logs = "".join(e["data"] for e in events if e["event"] == "build_log")
    assert logs.startswith("3.")
    assert "SEEDED=1" in result.manifest.config["env"]
    assert result.manifest.base.split("@")[0].endswith("library/python")
