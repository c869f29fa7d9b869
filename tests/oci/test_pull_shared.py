"""A blob shared by two images whose configs disagree on its diff_id (one of them wrong): the
wrong one never discards or un-verifies the blob the other image uses, whichever order they
come in and whichever path unpacks it; the wrong image is refused with its reference named."""

from __future__ import annotations

import gzip

import pytest

from tests.oci.conftest import one_file_tar, put_image, sha256
from tlimage.cache.cache import LayerCache
from tlimage.cache.layer import apply_layer, ensure_verified, unverified_diff_id
from tlimage.cache.unpacked import unpacked_layer
from tlimage.errors import OCIError
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import (
    OCI_LAYER_GZIP,
    RegistryConfig,
)

pytestmark = pytest.mark.slow


TAR = one_file_tar("shared.txt", b"shared")
BLOB = gzip.compress(TAR, mtime=0)
RIGHT = sha256(TAR)
WRONG = sha256(b"not the tar")


def cfg(reg) -> RegistryConfig:
    return RegistryConfig(insecure=(reg.host,), certs_dirs=(), backoff=0.05)


def put_shared(reg, ref: str, diff_id: str, marker: str) -> None:
    """An image of the one shared layer whose config says `diff_id` (`marker` makes the
    configs differ)."""
    put_image(reg, ref, BLOB, OCI_LAYER_GZIP, diff_id, {"Env": [marker]})


@pytest.fixture
def images(registry):
    good, bad = f"{registry.host}/shared/good:v1", f"{registry.host}/shared/bad:v1"
    put_shared(registry, good, RIGHT, "A=1")
    put_shared(registry, bad, WRONG, "B=1")
    return good, bad


def _extract(cache: LayerCache, digest: str, dest) -> None:
    """The non-overlay extract path (COPY --from without links, cache mounts, cache.apply)."""
    ensure_verified(cache.store, digest)
    with cache.store.open(digest, verify=True) as f:
        apply_layer(f, dest)


@pytest.mark.parametrize("unpack_first", [True, False])
def test_wrong_config_after_a_verified_or_pending_pull_keeps_the_blob(
    registry, images, tmp_path, unpack_first
):
    good, bad = images
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(good, cache, config=cfg(registry))
        digest = img.layers[0].digest
        if unpack_first:  # verified by its first unpack
            _extract(cache, digest, tmp_path / "first")
            assert unverified_diff_id(cache.store, digest) is None
        with pytest.raises(OCIError) as e:
            oci_pull.pull(bad, cache, config=cfg(registry))
        msg = str(e.value)
        assert msg.startswith(bad) and f"unpacks to {RIGHT}" in msg and WRONG in msg
        # The good image's blob is still there, verified, and unpacks by every path.
        assert cache.store.has(digest) and unverified_diff_id(cache.store, digest) is None
        _extract(cache, digest, tmp_path / "second")
        assert (tmp_path / "second" / "shared.txt").read_bytes() == b"shared"
        assert (unpacked_layer(cache.store, digest) / "shared.txt").read_bytes() == b"shared"
        again = oci_pull.pull(good, cache, config=cfg(registry))
        assert again.offline and cache.lookup(oci_pull.layer_key(sha256(BLOB))).diff_id == RIGHT


def test_right_config_after_a_wrong_pending_one_keeps_the_blob(registry, images, tmp_path):
    """The wrong image came first (its claim still pending): the right one settles the blob
    at once, and nothing the wrong claim noted can discard it later."""
    good, bad = images
    with LayerCache(tmp_path / "cache") as cache:
        wrong = oci_pull.pull(bad, cache, config=cfg(registry))
        digest = wrong.layers[0].digest
        assert unverified_diff_id(cache.store, digest) == WRONG
        img = oci_pull.pull(good, cache, config=cfg(registry))
        assert img.layers[0].digest == digest
        assert unverified_diff_id(cache.store, digest) is None
        _extract(cache, digest, tmp_path / "out")
        assert cache.store.has(digest)
        assert cache.lookup(oci_pull.layer_key(sha256(BLOB))).diff_id == RIGHT


def test_wrong_config_for_a_blob_a_local_image_holds(registry, images, tmp_path):
    """The blob is in the store from elsewhere (imported, no pull row names it): a pull that
    downloads it again with a wrong config neither un-verifies nor discards it."""
    from tlimage.oci.pull import ingest_layer

    _, bad = images
    with LayerCache(tmp_path / "cache") as cache:
        info, _ = ingest_layer(cache.store, iter([BLOB]), blob=sha256(BLOB), size=len(BLOB),
                               media_type=OCI_LAYER_GZIP, diff_id=RIGHT, label="import")  # fmt: skip
        with pytest.raises(OCIError, match=f"unpacks to {RIGHT}"):
            oci_pull.pull(bad, cache, config=cfg(registry))
        assert cache.store.has(info.digest)
        assert unverified_diff_id(cache.store, info.digest) is None
        _extract(cache, info.digest, tmp_path / "out")
        assert cache.lookup(oci_pull.layer_key(sha256(BLOB))) is None
