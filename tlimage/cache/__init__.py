"""The layer cache: content-addressed blobs, deterministic layers, keys and their inputs.

    store.py     blobs named by xxh3-128 under <root>/layers-v1/, atomic writes, verify-on-read
    layer.py     deterministic layer tars from overlay uppers or plain trees; safe apply
    filehash.py  file digests with a SQLite stat cache; digest_tree() for COPY/ADD sources
    ignore.py    .dockerignore rules (moby patternmatcher semantics)
    index.py     SQLite (WAL) index: key -> layer, each image's last build for --explain
    lock.py      shared (build) / exclusive (prune) flock that says what it waits for
    unpacked.py  stored layers unpacked once as overlayfs lower folders
    cache.py     LayerCache: the above as the builder uses them; LRU prune; ls
    keys.py      what goes into a cache key

Names below are imported lazily, so `import tlimage.cache` stays cheap for CLI start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LayerCache": "cache",
    "CacheEntry": "cache",
    "CacheUsage": "cache",
    "PruneResult": "cache",
    "parse_size": "cache",
    "BlobStore": "store",
    "BlobRef": "store",
    "CorruptBlob": "store",
    "BlobNotFound": "store",
    "default_cache_root": "store",
    "resolve_cache_root": "store",
    "LayerInfo": "layer",
    "LayerError": "layer",
    "ApplyStats": "layer",
    "apply_layer": "layer",
    "layer_from_dir": "layer",
    "layer_from_upper": "layer",
    "FileHasher": "filehash",
    "TreeDigest": "filehash",
    "ContextPathError": "filehash",
    "digest_tree": "filehash",
    "diff_manifests": "filehash",
    "IgnoreMatcher": "ignore",
    "LayerRecord": "index",
    "BuildStep": "index",
    "CacheLock": "lock",
    "LockTimeout": "lock",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlimage.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tlimage.cache.{module}"), name)
