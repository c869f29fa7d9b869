"""Push to real registries (plain, TLS + basic auth, bearer tokens); read back by skopeo,
umoci and podman; existence checks, cross-repository mounts, chunked uploads, the manifest
last."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.oci.conftest import free_port, need, skopeo_copy
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


def tl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_cli_push_gzip_pulled_and_run_by_podman(registry, built, podman):
    """`tl sbx image push --compression gzip --json`: events per blob and at the end; podman
    pulls the image and runs it; a failed push is an `error` event naming the reference."""
    ref = f"{registry.host}/app/pod:1"
    out = tl("sbx", "image", "push", "exp", ref, "--compression", "gzip", "--insecure-registry",
             registry.host, "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    blobs = [e for e in events if e["event"] == "push_blob"]
    assert len(blobs) == len(built.manifest.layers) + 1
    assert {e["status"] for e in blobs} == {"uploaded"} and {e["ref"] for e in blobs} == {ref}
    done = events[-1]
    assert done["event"] == "push_done" and done["uploaded"] == len(blobs)
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                     f"docker://{ref}"], capture_output=True, check=True,
                                    text=True).stdout)  # fmt: skip
    assert {la["mediaType"] for la in raw["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"}  # fmt: skip
    assert done["digest"] == "sha256:" + hashlib.sha256(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, check=True).stdout).hexdigest()  # fmt: skip

    podman("pull", "--tls-verify=false", ref)
    info = json.loads(podman("image", "inspect", ref).stdout)[0]
    assert info["Config"]["WorkingDir"] == "/data"
    assert podman.run(ref, "cat /etc/os-release") == "PRETTY_NAME=tlimage-exp"

    again = tl("sbx", "image", "push", "exp", ref, "--compression", "gzip",
               "--insecure-registry", registry.host)  # fmt: skip
    assert again.returncode == 0 and "0 uploaded" in again.stdout, again.stderr
    port = free_port()
    bad = tl("sbx", "image", "push", "exp", f"127.0.0.1:{port}/app/x:1", "--insecure-registry",
             f"127.0.0.1:{port}", "--json")  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    err = json.loads(bad.stdout.splitlines()[-1])
    assert err["event"] == "error" and err["message"].startswith(f"127.0.0.1:{port}/app/x:1: ")


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


def _requests(proxy, start: int = 0) -> list[tuple[str, str]]:
    """(method, kind) of the requests the proxy saw since `start`."""
    out = []
    for line in proxy.seen[start:]:
        method, path = line.split(" ", 1)
        kind = ("mount" if "mount=" in path else "upload" if "/blobs/uploads/" in path else
                "blob" if "/blobs/" in path else "manifest" if "/manifests/" in path else
                "other")  # fmt: skip
        out.append((method, kind))
    return out


def test_push_requests_head_mount_monolithic_chunked_manifest_last(registry, built):
    """Counted on the wire: HEAD per blob, one POST + one PUT per monolithic upload, PATCHes of
    chunk_size for a chunked one, a cross-repository mount instead of an upload, nothing but
    HEADs for a second push, and the manifest always the last request."""
    from tests.oci.test_faults import Proxy

    proxy = Proxy(registry.host)
    proxy.forward_host = True
    conf = RegistryConfig(insecure=(proxy.host,), certs_dirs=(), backoff=0.05)
    n = len(built.manifest.layers) + 1  # blobs: the layers and the config
    try:
        with LayerCache() as cache:
            img = local_image(built)
            push(cache.store, img, f"{proxy.host}/app/wire:1", config=conf, jobs=1)
            first = _requests(proxy)
            assert first.count(("HEAD", "blob")) == n
            assert first.count(("POST", "upload")) == n and first.count(("PUT", "upload")) == n
            assert ("PATCH", "upload") not in first
            assert first[-1] == ("PUT", "manifest") and first.count(("PUT", "manifest")) == 1

            mark = len(proxy.seen)
            again = push(cache.store, img, f"{proxy.host}/app/wire:2", config=conf)
            second = _requests(proxy, mark)
            assert again.existing and not again.uploaded
            assert sorted(set(second)) == [("HEAD", "blob"), ("PUT", "manifest")]
            assert second.count(("HEAD", "blob")) == n and second[-1] == ("PUT", "manifest")

            mark = len(proxy.seen)
            other = push(cache.store, img, f"{proxy.host}/other/wire:1", config=conf)
            third = _requests(proxy, mark)
            assert len(other.mounted) == n and third.count(("POST", "mount")) == n
            assert ("PUT", "upload") not in third and ("PATCH", "upload") not in third

            mark = len(proxy.seen)
            events: list[dict] = []
            chunk = 16 << 10
            push(cache.store, img, f"{proxy.host}/app/wire:gz", config=conf, jobs=1,
                 compression="gzip", chunk_size=chunk, progress=events.append)  # fmt: skip
            fourth = _requests(proxy, mark)
            sizes = [e["size"] for e in events if e.get("status") == "uploaded"]
            assert sizes, "gzip layers are new blobs: uploaded"
            patches = sum(-(-s // chunk) for s in sizes)
            assert fourth.count(("PATCH", "upload")) == patches > len(sizes)
            assert fourth[-1] == ("PUT", "manifest")
    finally:
        proxy.close()
    info = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{registry.host}/app/wire:gz"],
                                     capture_output=True, check=True, text=True).stdout)  # fmt: skip
    assert all(la["mediaType"].endswith("tar+gzip") for la in info["layers"])


def test_a_push_cut_by_a_stopped_registry_leaves_no_tag(registry, built):
    """The registry goes away after the first blob: the push fails naming the reference, and
    once the registry is back the tag does not exist (the manifest was never sent)."""
    need("skopeo")
    ref = f"{registry.host}/app/cut:1"

    def stop_after_first_blob(ev: dict) -> None:
        if ev["event"] == "push_blob":
            registry.stop()

    with LayerCache() as cache, pytest.raises(OCIError) as e:
        push(cache.store, local_image(built), ref, config=cfg(registry, retries=1), jobs=1,
             progress=stop_after_first_blob)  # fmt: skip
    assert str(e.value).startswith(ref) and "cannot reach" in str(e.value)
    registry.start()
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "manifest unknown" in proc.stderr


def test_push_retries_5xx_and_errors_name_the_reference(registry, tls_registry, built, tmp_path):
    from tests.oci.test_faults import Proxy

    proxy = Proxy(registry.host)
    proxy.forward_host = True
    # A 503 on an upload's PUT and a 500 on the manifest: retried, the push succeeds.
    proxy.faults = [("digest=", ("status", 503, {})), ("/manifests/", ("status", 500, {}))]
    ref = f"{proxy.host}/app/retry:1"
    try:
        with LayerCache() as cache:
            stats = push(cache.store, local_image(built), ref, config=RegistryConfig(
                insecure=(proxy.host,), certs_dirs=(), backoff=0.01))  # fmt: skip
    finally:
        proxy.close()
    assert proxy.faults == [] and stats.digest
    assert sum(s.startswith("PUT") and "/manifests/" in s for s in proxy.seen) == 2
    # Wrong credentials: the error names the reference, the registry and the file tried.
    bad = tmp_path / "bad-auth.json"
    bad.write_text(json.dumps({"auths": {tls_registry.host: {"auth": "YWxpY2U6d3Jvbmc="}}}))
    ref = f"{tls_registry.host}/a/denied:1"
    with LayerCache() as cache, pytest.raises(OCIError) as e:
        push(cache.store, local_image(built), ref, config=RegistryConfig(
            certs_dirs=(str(tls_registry.certs_dir),), auth_files=(str(bad),), retries=0))  # fmt: skip
    msg = str(e.value)
    assert msg.startswith(ref) and f"access to {tls_registry.host} denied (401)" in msg
    assert str(bad) in msg


def test_a_mount_the_registry_refuses_uploads_into_the_session_it_opened(registry, built):
    """A cross-repository mount the registry cannot do (the blob left the source repository)
    opens a plain upload: the blob goes into that session, no second one is started."""
    import httpx

    from tests.oci.test_faults import Proxy

    proxy = Proxy(registry.host)
    proxy.forward_host = True
    conf = RegistryConfig(insecure=(proxy.host,), certs_dirs=(), backoff=0.05)
    try:
        with LayerCache() as cache:
            img = local_image(built)
            first = push(cache.store, img, f"{proxy.host}/src/m:1", config=conf)
            for digest in first.uploaded:  # unlink every blob from src/m
                r = httpx.delete(f"http://{registry.host}/v2/src/m/blobs/{digest}")
                assert r.status_code == 202, r.text
            mark = len(proxy.seen)
            second = push(cache.store, img, f"{proxy.host}/dst/m:1", config=conf)
            wire = _requests(proxy, mark)
    finally:
        proxy.close()
    n = len(first.uploaded)
    assert second.mounted == [] and len(second.uploaded) == n
    assert wire.count(("POST", "mount")) == n and ("POST", "upload") not in wire
    assert wire.count(("PUT", "upload")) == n and wire[-1] == ("PUT", "manifest")
