"""Push to real registries (plain, TLS + basic auth, bearer tokens); read back by skopeo,
umoci and podman; existence checks, cross-repository mounts, chunked uploads, the manifest
last."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.oci.conftest import need, skopeo_copy
from tests.oci.test_layout import IMAGE
from tests.oci.test_pull import tree, umoci_rootfs, unpack_layers
from tlimage.builder import build_image
from tlimage.builder.images import local_image
from tlimage.cache.cache import LayerCache
from tlimage.errors import OCIError
from tlimage.executor.fake import FakeExecutor
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import RegistryConfig
from tlimage.oci.push import push

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root"),
]


@pytest.fixture
def built(tmp_path):
    (tmp_path / "image.py").write_text(IMAGE)
    return build_image(tmp_path / "image.py", executor=FakeExecutor()).record


def cfg(reg, **kw):
    return RegistryConfig(insecure=(reg.host,), certs_dirs=(), backoff=0.05, **kw)


def test_push_read_back_by_skopeo_umoci_and_pulled_again(registry, built, tmp_path):
    need("skopeo", "umoci")
    ref = f"{registry.host}/app/exp:1"
    with LayerCache() as cache:
        ours = unpack_layers(cache, built.manifest.layers, tmp_path / "ours")
        stats = push(cache.store, local_image(built), ref, config=cfg(registry))
        assert len(stats.uploaded) == len(built.manifest.layers) + 1  # + the config
        again = push(cache.store, local_image(built), ref, config=cfg(registry))
        assert again.uploaded == [] and again.digest == stats.digest  # HEAD: nothing re-sent
        other = push(cache.store, local_image(built), f"{registry.host}/other/exp:1",
                     config=cfg(registry))  # fmt: skip
        assert other.uploaded == [] and len(other.mounted) == len(stats.uploaded)
        gz = push(cache.store, local_image(built), f"{registry.host}/app/exp:gz",
                  config=cfg(registry), compression="gzip", chunk_size=64 << 10)  # fmt: skip
        assert gz.digest != stats.digest
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert json.loads(raw)["layers"][0]["mediaType"].endswith("+zstd")
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                                      f"docker://{ref}"], capture_output=True, check=True,
                                     text=True).stdout)  # fmt: skip
    assert info["Digest"] == stats.digest and "MODE=prod" in info["Env"]
    layout = tmp_path / "layout"
    skopeo_copy(f"docker://{registry.host}/app/exp:gz", f"oci:{layout}:gz",
                "--src-tls-verify=false")  # fmt: skip
    theirs = umoci_rootfs(layout, "gz", tmp_path / "umoci")
    assert tree(ours) == tree(theirs)
    with LayerCache(tmp_path / "second-machine") as cache:
        img = oci_pull.pull(ref, cache, config=cfg(registry))
        assert img.digest == stats.digest
        assert [la.diff_id for la in img.layers] == [la.diff_id for la in built.manifest.layers]
        assert tree(unpack_layers(cache, img.layers, tmp_path / "pulled")) == tree(ours)


def test_podman_pulls_a_pushed_image(registry, built, tmp_path):
    need("podman")
    ref = f"{registry.host}/app/pod:1"
    with LayerCache() as cache:
        push(cache.store, local_image(built), ref, config=cfg(registry), compression="gzip")
    run = Path(tempfile.mkdtemp(prefix="tlp-", dir="/tmp"))
    base = ["podman", "--root", str(tmp_path / "proot"), "--runroot", str(run),
            "--storage-driver", "vfs"]  # fmt: skip
    try:
        proc = subprocess.run([*base, "pull", "--tls-verify=false", ref], capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(subprocess.run([*base, "image", "inspect", ref], capture_output=True,
                                        check=True, text=True).stdout)  # fmt: skip
        assert out[0]["Config"]["WorkingDir"] == "/data"
    finally:
        subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True)
        shutil.rmtree(run, ignore_errors=True)


def test_push_with_tls_basic_auth_and_tokens(tls_registry, token_registry, built):
    with LayerCache() as cache:
        conf = RegistryConfig(certs_dirs=(str(tls_registry.certs_dir),),
                              auth_files=(str(tls_registry.auth_file),))  # fmt: skip
        s = push(cache.store, local_image(built), f"{tls_registry.host}/a/b:1", config=conf)
        assert s.uploaded
        anon = RegistryConfig(insecure=(token_registry.host,), certs_dirs=(), retries=0)
        with pytest.raises(OCIError, match="credentials tried: none"):
            push(cache.store, local_image(built), f"{token_registry.host}/public/x:1", config=anon)
        creds = RegistryConfig(insecure=(token_registry.host,), certs_dirs=(),
                               auth_files=(str(token_registry.auth_file),))  # fmt: skip
        s = push(cache.store, local_image(built), f"{token_registry.host}/public/x:1",
                 config=creds)  # fmt: skip
        # Anonymous pull of what bob pushed (public/*): the bearer flow end to end.
        img = oci_pull.pull(f"{token_registry.host}/public/x:1", cache, config=anon)
        assert img.digest == s.digest


def test_failed_push_leaves_no_tag(registry, built, tmp_path):
    """A blob upload that fails: the manifest is never sent, so the tag does not exist."""
    from tests.oci.test_faults import Proxy

    proxy = Proxy(registry.host)
    proxy.faults = [("/blobs/uploads/", ("status", 500, {}))] * 50
    try:
        with LayerCache() as cache, pytest.raises(OCIError, match="answered 500"):
            push(cache.store, local_image(built), f"{proxy.host}/app/half:1",
                 config=RegistryConfig(insecure=(proxy.host,), certs_dirs=(), retries=1,
                                       backoff=0.01))  # fmt: skip
    finally:
        proxy.close()
    assert not any("/manifests/" in s and s.startswith("PUT") for s in proxy.seen)
    proc = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/app/half:1"],
        capture_output=True,
    )
    assert proc.returncode != 0
