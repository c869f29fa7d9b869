"""Pruning the cache without breaking registered images, and sweeping what crashed builds left.

Registered images need their layer blobs and manifests even when no cache row names them any
more, so `prune` pins them (`keep_digests`); a pruned layer's unpacked copy goes with it. Scratch
folders are named after the process that made them and removed once it is gone.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tlimage.builder.rootfs import unpacked_root
from tlimage.cache.cache import LayerCache, PruneResult
from tlimage.cache.store import BlobStore, parse_digest, pid_alive
from tlimage.registry import Registry

_STALE_S = 24 * 3600


def pinned_digests() -> set[str]:
    """Layers and manifests of every registered image (a manifest blob is named by the image
    id: both are the xxh3-128 of the manifest bytes), and the layers live sandboxes run on
    (their unpacked folders are a namespace sandbox's lowers)."""
    from tlimage.runtime import live_layer_digests

    out: set[str] = set(live_layer_digests())
    for rec in Registry().list():
        out.update(layer.digest for layer in rec.manifest.layers)
        out.add(f"xxh3:{rec.image_id}")
    return out


def prune(cache_dir: Path | None, keep_storage: int) -> PruneResult:
    with LayerCache(cache_dir) as cache:
        unpacked = unpacked_root(cache.store)

        def drop_unpacked(digest: str) -> None:
            shutil.rmtree(unpacked / parse_digest(digest), ignore_errors=True)

        result = cache.prune(keep_storage, keep_digests=pinned_digests(), on_delete=drop_unpacked)
        sweep_scratch(cache.store)
        return result


def scratch_name(prefix: str) -> str:
    """A scratch folder prefix that records its owner, for `sweep_scratch`."""
    return f"{prefix}{os.getpid()}-"


def sweep_scratch(store: BlobStore) -> int:
    """Remove scratch and half-unpacked folders whose process is gone (or that are older than a
    day, in case of pid reuse). Returns how many were removed."""
    removed = 0
    now = time.time()
    for folder, prefix in ((Path(store.path) / "tmp", "tlimage-"),
                           (unpacked_root(store), ".tmp-")):  # fmt: skip
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid = _pid_of(entry.name)
            try:
                age = now - entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            if pid is not None and pid_alive(pid) and age < _STALE_S:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _pid_of(name: str) -> int | None:
    for part in name.split("-"):
        if part.isdigit():
            return int(part)
    return None

