"""Pruning the cache without breaking registered images.

`LayerCache.prune` drops least-recently-used index rows and their blobs. A registered image
needs its layers even when no cache row names them any more, so before pruning every layer a
registered image uses is touched (made most recent) and is never counted against the budget
below what registered images need.
"""

from __future__ import annotations

from pathlib import Path

from tlimage.cache.cache import LayerCache, PruneResult
from tlimage.registry import Registry


def prune(cache_dir: Path | None, keep_storage: int) -> PruneResult:
    needed = Registry().referenced_layers()
    with LayerCache(cache_dir) as cache:
        keep_keys = [r.key for r in cache.index.records() if r.digest in needed]
        cache.index.touch(keep_keys, when=float("inf"))
        try:
            size_needed = sum({r.digest: r.size for r in cache.index.records()
                               if r.digest in needed}.values())  # fmt: skip
            return cache.prune(keep_storage=max(keep_storage, size_needed))
        finally:
            import time

            cache.index.touch(keep_keys, when=time.time())
