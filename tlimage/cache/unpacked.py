"""Layers as overlayfs lower directories.

Each stored layer is unpacked once into `<cache>/layers-v1/unpacked-v2/<hex>/` in overlayfs' own
format: an OCI whiteout `.wh.name` becomes a 0:0 character device `name`, an opaque marker
`.wh..wh..opq` becomes the `trusted.overlay.opaque=y` xattr on its folder. A stack of such folders
is a valid `lowerdir=` list, so a step's root filesystem costs no copying.

The unpack goes to a temp folder beside the final one and is renamed into place, so a crash
leaves no half-unpacked layer under a final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tlimage import _layout
from tlimage.cache.store import BlobStore, parse_digest
from tlimage.errors import CacheError


def unpacked_root(store: BlobStore) -> Path:
    return _layout.UNPACKED.under(store.root)


def unpacked_layer(store: BlobStore, digest: str) -> Path:
    """The overlay-format folder of a stored layer, unpacking it on first use."""
    final = unpacked_root(store) / parse_digest(digest)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{os.getpid()}-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        from tlimage.cache.layer import settle_diff_id, unverified_diff_id

        pending = unverified_diff_id(store, digest) is not None  # a pulled layer's first read
        with store.open(digest, verify=True) as raw:
            diff_id = unpack_for_overlay(raw, tmp, hash_tar=pending)
            while raw.read(1 << 20):  # to the end: the verifying reader checks the digest there
                pass
        if diff_id is not None:
            settle_diff_id(store, digest, diff_id)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another build won the race: fine; anything else: raise
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def adopt_upper(store: BlobStore, digest: str, upper: Path) -> None:
    """Keep a step's upper folder as the unpacked form of the layer just made from it, so the
    next step's lowers cost a rename instead of an unpack. (Its mtimes are the step's own rather
    than the layer's clamped ones; overlayfs does not care, and the layer is what is kept.)"""
    final = unpacked_root(store) / parse_digest(digest)
    if final.exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(upper, final)
    except OSError:
        pass  # another build adopted it first, or another filesystem: unpack on demand


def unpack_for_overlay(raw, dest: Path, *, hash_tar: bool = False) -> str | None:  # noqa: ANN001
    """Extract a stored layer (`raw`: a readable binary stream) as an overlay lower (see
    `tlimage._fs.Extractor`: nothing is written, linked or followed outside `dest`). With
    `hash_tar`, returns the diff_id (`sha256:` of the whole tar), else None."""
    import zstandard

    from tlimage._fs import extract_tar
    from tlimage.cache.layer import BadCompression, HashingReader, open_tar

    reader, kind = open_tar(raw)
    hashing = HashingReader(reader) if hash_tar else None
    try:
        extract_tar(hashing or reader, dest, mode="r|", whiteouts="overlay", same_owner=True,
                    error=CacheError)  # fmt: skip
        return hashing.drain() if hashing else None
    except (zstandard.ZstdError, BadCompression) as e:
        raise CacheError(f"layer {dest.name} is not valid {kind} data: {e}") from None


def merge_lowers(lowers: list[Path] | tuple[Path, ...], dest: Path) -> None:
    """Lay the stack `lowers` (bottom first, overlay format) out in the empty folder `dest` as
    one plain tree, as overlayfs would show it: whiteouts delete, opaque folders hide what is
    below. Files are hard links to the unpacked layers (read only, no data is copied), so
    this costs a walk instead of decompressing and extracting every layer. Raises OSError
    when links cannot be made (another filesystem, protected_hardlinks): callers fall back
    to extracting the layers."""
    from tlimage._fs import lay_out_layers

    lay_out_layers(lowers, dest, place="link")
