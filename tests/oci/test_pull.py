"""Pulls from a real registry (docker-registry) of images another toolchain made (umoci, put in
with skopeo): content, whiteouts, auth flows, platforms, and the fault cases."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.oci.conftest import need, one_file_tar, put_image, sha256, skopeo_copy, umoci_image
from tlimage.cache.cache import LayerCache
from tlimage.cache.layer import apply_layer
from tlimage.errors import OCIError
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import OCI_MANIFEST, RegistryConfig

pytestmark = pytest.mark.slow

LAYERS = [
    {
        "etc/": "",
        "etc/os-release": b"ID=test\n",
        "bin/": "",
        "bin/tool": b"#!/bin/sh\necho hi\n",
        "usr/lib/": "",
        "usr/lib/gone.txt": b"x",
        "opt/": "",
        "opt/a/": "",
        "opt/a/f": b"1",
    },
    {
        "usr/lib/gone.txt": None,
        "etc/motd": b"hello\n",
        "link": ("symlink", "/etc/motd"),
        "opt/a/": None,
    },
]


def tree(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, content or link target), for comparing root filesystems."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, p.read_bytes())
    return out


def unpack_layers(cache: LayerCache, layers, dest: Path) -> Path:
    dest.mkdir()
    for la in layers:
        with cache.store.open(la.digest, verify=True) as f:
            apply_layer(f, dest)
    return dest


def umoci_rootfs(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)], check=True,
                   capture_output=True)  # fmt: skip
    return dest / "rootfs"


@pytest.fixture
def pushed(registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS,
                         ["--config.env=FOO=bar", "--config.workingdir=/opt",
                          "--config.cmd=/bin/tool"])  # fmt: skip
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/test/img:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    return layout


def cfg(reg, **kw) -> RegistryConfig:
    return RegistryConfig(insecure=(reg.host,), certs_dirs=(), backoff=0.05, **kw)


def test_pull_matches_umoci_unpack(registry, pushed, tmp_path):
    events = []
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{registry.host}/test/img:v1", cache, config=cfg(registry),
                            progress=events.append)  # fmt: skip
        assert img.digest.startswith("sha256:") and len(img.layers) == 2
        assert img.downloaded == 2
        assert "FOO=bar" in img.config["config"]["Env"]
        ours = unpack_layers(cache, img.layers, tmp_path / "ours")
    theirs = umoci_rootfs(pushed, "v1", tmp_path / "umoci")
    assert tree(ours) == tree(theirs)
    assert not (ours / "usr/lib/gone.txt").exists() and os.readlink(ours / "link") == "/etc/motd"
    kinds = {e["event"] for e in events}
    assert {"pull_started", "pull_layer", "pull_done"} <= kinds


def test_gzip_layers_are_kept_as_sent_and_pushed_back_unchanged(registry, pushed, tmp_path):
    """umoci writes gzip layers: the store keeps the registry's bytes (no recompression), and a
    push of the pulled image finds every layer already there under the same digest."""
    import hashlib

    from tlimage.cache.layer import blob_compression
    from tlimage.oci.layout import LocalImage
    from tlimage.oci.push import push

    ref = f"{registry.host}/test/img:v1"
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(ref, cache, config=cfg(registry))
        for la in img.layers:
            data = cache.store.read_bytes(la.digest)
            assert "sha256:" + hashlib.sha256(data).hexdigest() == la.blob
            assert blob_compression(cache.store.blob_path(la.digest)) == "gzip"
        local = LocalImage([(la.digest, la.diff_id) for la in img.layers], img.config["config"])
        stats = push(cache.store, local, f"{registry.host}/test/img:copy", config=cfg(registry),
                     cache_root=tmp_path / "hints")  # fmt: skip
    assert set(stats.existing) >= {la.blob for la in img.layers} and stats.bytes < 4096
    from tlimage.oci.client import RegistryClient
    from tlimage.oci.reference import parse

    with RegistryClient(cfg(registry)) as c:
        fetched, _ = c.get_manifest(parse(f"{registry.host}/test/img:copy"))
    layers = json.loads(fetched.data)["layers"]
    assert [la["digest"] for la in layers] == [la.blob for la in img.layers]
    assert all(la["mediaType"].endswith("+gzip") for la in layers)


def test_second_pull_is_offline_and_refresh_sees_a_moved_tag(registry, pushed, tmp_path):
    ref = f"{registry.host}/test/img:v1"
    with LayerCache(tmp_path / "cache") as cache:
        first = oci_pull.pull(ref, cache, config=cfg(registry))
        registry.stop()  # no network needed now
        again = oci_pull.pull(ref, cache, config=cfg(registry))
        assert again.offline and again.digest == first.digest
        # Nor a client: a fresh process answers without importing the HTTP stack.
        code = ("import sys; from tlimage.cache.cache import LayerCache; "
                "from tlimage.oci import pull; c = LayerCache(sys.argv[1]); "
                "img = pull.pull(sys.argv[2], c); "
                "print(img.offline, 'httpx' in sys.modules)")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache"), ref],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert out.split() == ["True", "False"], out
        registry.start()
        umoci_image(pushed, "v1", [{"etc/new": b"moved"}])
        skopeo_copy(f"oci:{pushed}:v1", f"docker://{ref}", *registry.skopeo_flags("dest"))
        moved = oci_pull.pull(ref, cache, config=cfg(registry), refresh=True)
        assert moved.digest != first.digest and moved.moved_from == first.digest
        assert moved.downloaded == 1  # the two old layers were already stored


def test_pull_by_digest_and_unknown_tag(registry, pushed, tmp_path):
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{registry.host}/test/img:v1", cache, config=cfg(registry))
        by_digest = oci_pull.pull(f"{registry.host}/test/img@{img.digest}", cache,
                                  config=cfg(registry), refresh=True)  # fmt: skip
        assert by_digest.digest == img.digest
        with pytest.raises(OCIError, match="unknown image or tag 'nope'"):
            oci_pull.pull(f"{registry.host}/test/img:nope", cache, config=cfg(registry))
        with pytest.raises(OCIError, match="unknown image or tag"):
            oci_pull.pull(f"{registry.host}/no/such:v1", cache, config=cfg(registry))


def test_tls_and_basic_auth(tls_registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS[:1])
    skopeo_copy(f"oci:{layout}:v1", f"docker://{tls_registry.host}/priv/img:v1",
                *tls_registry.skopeo_flags("dest"))  # fmt: skip
    ref = f"{tls_registry.host}/priv/img:v1"
    with LayerCache(tmp_path / "cache") as cache:
        # The CA is not trusted: a clear TLS error.
        with pytest.raises(OCIError, match="cannot reach"):
            oci_pull.pull(ref, cache, config=RegistryConfig(certs_dirs=(), retries=0))
        # Trusted, but no credentials: says which were tried.
        with pytest.raises(OCIError, match="user name and password"):
            oci_pull.pull(
                ref,
                cache,
                config=RegistryConfig(certs_dirs=(str(tls_registry.certs_dir),), retries=0),
            )
        img = oci_pull.pull(
            ref,
            cache,
            config=RegistryConfig(
                certs_dirs=(str(tls_registry.certs_dir),), auth_files=(str(tls_registry.auth_file),)
            ),
        )
        assert len(img.layers) == 1


def test_bearer_token_flow(token_registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS[:1])
    for repo in ("public/img", "private/img"):
        skopeo_copy(f"oci:{layout}:v1", f"docker://{token_registry.host}/{repo}:v1",
                    "--dest-tls-verify=false", "--dest-creds=bob:pw")  # fmt: skip
    issuer = token_registry.extra["issuer"]
    issuer.requests.clear()
    anon = RegistryConfig(insecure=(token_registry.host,), certs_dirs=(), retries=0)
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{token_registry.host}/public/img:v1", cache, config=anon)
        assert len(img.layers) == 1
        assert issuer.requests[0] == {
            "user": None,
            "scope": ["repository:public/img:pull"],
            "service": "test-registry",
        }
        with pytest.raises(OCIError, match=r"denied.*credentials tried: none \(anonymous\)"):
            oci_pull.pull(f"{token_registry.host}/private/img:v1", cache, config=anon)
        creds = RegistryConfig(insecure=(token_registry.host,), certs_dirs=(),
                               auth_files=(str(token_registry.auth_file),))  # fmt: skip
        img = oci_pull.pull(f"{token_registry.host}/private/img:v1", cache, config=creds)
        assert issuer.requests[-1]["user"] == "bob"


def test_platform_selection_from_an_index(registry, tmp_path):
    need("skopeo")
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS[:1])
    ref = f"{registry.host}/multi/img"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}:amd", *registry.skopeo_flags("dest"))
    with LayerCache(tmp_path / "cache") as cache:
        single = oci_pull.pull(f"{ref}:amd", cache, config=cfg(registry))
        # An index naming this manifest for linux/amd64 and linux/arm64/v8 (same content).
        mbytes = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}:amd"],
            capture_output=True,
            check=True,
        ).stdout
        entry = {
            "mediaType": json.loads(mbytes).get("mediaType", OCI_MANIFEST),
            "digest": single.digest,
            "size": len(mbytes),
        }
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
                {**entry, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        }
        from tlimage.oci.client import RegistryClient
        from tlimage.oci.reference import parse

        with RegistryClient(cfg(registry)) as c:
            ep = c.endpoints(parse(f"{ref}:multi"))[0]
            c.put_manifest(
                ep,
                "multi",
                json.dumps(index).encode(),
                "application/vnd.oci.image.index.v1+json",
                label="test",
            )
        img = oci_pull.pull(f"{ref}:multi", cache, config=cfg(registry), platform="linux/arm64")
        assert img.digest == single.digest and img.index_digest
        with pytest.raises(
            OCIError,
            match="no image for platform linux/s390x; the index has: linux/amd64, linux/arm64",
        ):
            oci_pull.pull(f"{ref}:multi", cache, config=cfg(registry), platform="linux/s390x")


def test_multi_frame_zstd_layer_unpacks_whole(registry, tmp_path):
    """A zstd layer of several frames (as zstd:chunked writers make) is kept byte for byte and
    unpacks completely, also as an overlay lower."""
    import io
    import tarfile

    import zstandard

    from tlimage.cache.unpacked import unpacked_layer
    from tlimage.oci.client import OCI_LAYER_ZSTD

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3):
            data = os.urandom(300_000)
            ti = tarfile.TarInfo(f"f{i}.bin")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    cctx = zstandard.ZstdCompressor()
    third = len(tar) // 3
    blob = b"".join(cctx.compress(tar[i : i + third]) for i in range(0, len(tar), third))
    ref = f"{registry.host}/frames/img:v1"
    put_image(registry, ref, blob, OCI_LAYER_ZSTD, sha256(tar))
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(ref, cache, config=cfg(registry))
        assert cache.store.read_bytes(img.layers[0].digest) == blob  # kept as sent
        lower = unpacked_layer(cache.store, img.layers[0].digest)
        assert sorted(p.name for p in lower.iterdir()) == ["f0.bin", "f1.bin", "f2.bin"]
        assert (lower / "f2.bin").stat().st_size == 300_000


def test_wrong_diff_id_is_caught_by_the_first_unpack(registry, tmp_path):
    """A layer whose blob matches the manifest but whose tar does not match the config's
    diff_id: the pull stores it as sent (its sha256 is right), the first unpack finds the
    diff_id wrong, discards the blob and says so; pulling again fetches it again."""
    import gzip

    from tlimage.cache.layer import LayerError
    from tlimage.cache.unpacked import unpacked_layer
    from tlimage.oci.client import OCI_LAYER_GZIP

    tar = one_file_tar("f.txt", b"abc")
    blob = gzip.compress(tar, mtime=0)
    wrong = sha256(b"not the tar")
    ref = f"{registry.host}/bad/diffid:v1"
    put_image(registry, ref, blob, OCI_LAYER_GZIP, wrong)
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(ref, cache, config=cfg(registry))
        digest = img.layers[0].digest
        with pytest.raises(LayerError, match=f"of {ref} unpacks to {sha256(tar)}.*says "
                           f"{wrong}"):  # fmt: skip
            unpacked_layer(cache.store, digest)
        assert not cache.store.has(digest)
        again = oci_pull.pull(ref, cache, config=cfg(registry))
        assert again.downloaded == 1 and cache.store.has(digest)
