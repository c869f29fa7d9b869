"""`LayerCache`: the store, the index and the lock behind one object, as the builder uses them.

    cache = LayerCache(cache_dir)                 # None: TLIMAGE_CACHE_DIR or the user cache dir
    with cache.session():                         # a build: shared lock for its whole duration
        rec = cache.lookup(key)                   # LayerRecord or None (a miss)
        if rec is None:
            rec = cache.store_upper(key, upper_dir, description="RUN make")
        cache.apply(rec, rootfs)                  # extract it (verifying the blob as it is read)
    cache.prune(keep_storage=10 * 2**30)          # exclusive lock, LRU by last use

Crash safety: a blob is written to a temp file, fsynced and renamed before its index row is
inserted; prune deletes rows before blobs. A build killed at any point leaves either nothing, a
temp file (swept once its pid is gone), or an unindexed blob (removed by prune) — never a row
naming a missing or partial blob. A row whose blob fails verification is dropped and reads as a
miss, so the step simply runs again.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from tlimage.cache.index import BuildStep, CacheIndex, LayerRecord
from tlimage.cache.layer import (
    DEFAULT_LEVEL,
    ApplyStats,
    LayerInfo,
    apply_layer,
    layer_from_dir,
    layer_from_upper,
)
from tlimage.cache.lock import DEFAULT_TIMEOUT_S, CacheLock, _stderr
from tlimage.cache.store import BlobStore
from tlimage.errors import CacheError

STAT_CACHE_MAX_AGE_S = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One row of `tl sbx image cache ls`."""

    key: str
    digest: str
    size: int
    uncompressed_size: int
    description: str
    created_at: float
    last_used: float
    shared: bool  # another key points at the same blob (its size is counted once)


@dataclass(frozen=True, slots=True)
class CacheUsage:
    entries: int
    blobs: int
    bytes: int  # distinct blobs, compressed


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed_entries: int
    removed_blobs: int
    freed_bytes: int
    remaining_bytes: int
    swept_temp_files: int
    swept_orphan_blobs: int


class LayerCache:
    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = DEFAULT_TIMEOUT_S,
        on_wait: Callable[[str], None] | None = _stderr,
    ) -> None:
        self.store = BlobStore(cache_dir)
        self.root = self.store.root
        self.index = CacheIndex(self.store.path / "index.db")
        self.lock = CacheLock(self.store.path / "lock")
        self.lock_timeout = lock_timeout
        self.on_wait = on_wait

    def __repr__(self) -> str:
        return f"LayerCache({str(self.root)!r})"

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> LayerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hasher(self, **kw: Any):  # -> FileHasher
        """A FileHasher whose stat cache lives in this cache root."""
        from tlimage.cache.filehash import FileHasher

        return FileHasher.for_cache(self.root, **kw)

    @contextlib.contextmanager
    def session(self, *, purpose: str = "build") -> Iterator[LayerCache]:
        """Hold the shared lock (for a build's whole duration); sweeps dead writers' temp files."""
        with self.lock.shared(purpose=purpose, timeout=self.lock_timeout, on_wait=self.on_wait):
            self.store.sweep_temp()
            yield self

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, key: str, *, verify: bool = False) -> LayerRecord | None:
        """The layer cached for `key`, or None.

        Always checks that the blob exists with the recorded size (one stat); `verify=True`
        also hashes it. A bad or missing blob is discarded with every row naming it, and the
        lookup is a miss.
        """
        rec = self.index.get(key)
        if rec is None:
            return None
        size = self.store.size(rec.digest)
        good = size == rec.size and (not verify or self.store.verify(rec.digest))
        if not good:
            self.index.delete_digest(rec.digest)
            self.store.delete(rec.digest)
            return None
        return rec

    def open_layer(self, rec: LayerRecord | str, *, verify: bool = True) -> BinaryIO:
        """The compressed blob of a layer (a record or a digest); verified while read."""
        digest = rec.digest if isinstance(rec, LayerRecord) else rec
        return self.store.open(digest, verify=verify)

    def apply(self, rec: LayerRecord, dest_dir: str | os.PathLike[str], **kw: Any) -> ApplyStats:
        """Extract a cached layer onto `dest_dir`. A corrupt blob raises CorruptBlob (it and
        its rows are dropped); `dest_dir` is then half-written and must be discarded."""
        from tlimage.cache.layer import ensure_verified
        from tlimage.cache.store import CorruptBlob

        try:
            ensure_verified(self.store, rec.digest)
            with self.open_layer(rec, verify=True) as f:
                return apply_layer(f, dest_dir, **kw)
        except CorruptBlob:
            self.index.delete_digest(rec.digest)
            raise

    # -- storing ------------------------------------------------------------------------------

    def store_upper(
        self,
        key: str,
        upper_dir: str | os.PathLike[str],
        *,
        description: str = "",
        opaque_dirs: Iterable[str] = (),
        mtime: int = 0,
        level: int = DEFAULT_LEVEL,
        meta: dict[str, Any] | None = None,
    ) -> LayerRecord:
        """Archive an overlay upper directory as the layer for `key`."""
        info = layer_from_upper(
            upper_dir, self.store, opaque_dirs=opaque_dirs, mtime=mtime, level=level
        )
        return self.put(key, info, description=description, meta=meta)

    def store_dir(
        self,
        key: str,
        root: str | os.PathLike[str],
        *,
        description: str = "",
        mtime: int = 0,
        level: int = DEFAULT_LEVEL,
        meta: dict[str, Any] | None = None,
    ) -> LayerRecord:
        """Archive a plain tree (a base rootfs, files a COPY produced) as the layer for `key`."""
        info = layer_from_dir(root, self.store, mtime=mtime, level=level)
        return self.put(key, info, description=description, meta=meta)

    def put(
        self,
        key: str,
        info: LayerInfo,
        *,
        description: str = "",
        meta: dict[str, Any] | None = None,
    ) -> LayerRecord:
        """Index a layer whose blob is already in the store."""
        if self.store.size(info.digest) != info.size:
            raise CacheError(f"cannot index {key}: blob {info.digest} is not in the store")
        return self.index.put(
            key,
            digest=info.digest,
            diff_id=info.diff_id,
            size=info.size,
            uncompressed_size=info.uncompressed_size,
            description=description,
            meta=meta,
        )

    # -- last builds, for --explain -----------------------------------------------------------

    def record_build(self, image: str, steps: Sequence[BuildStep | tuple[str, dict]]) -> None:
        self.index.record_build(image, steps)

    def last_build(self, image: str) -> list[BuildStep] | None:
        return self.index.last_build(image)

    # -- listing and pruning ------------------------------------------------------------------

    def ls(self) -> list[CacheEntry]:
        """Every cached layer, most recently used first."""
        records = self.index.records()
        per_digest: dict[str, int] = {}
        for r in records:
            per_digest[r.digest] = per_digest.get(r.digest, 0) + 1
        return [
            CacheEntry(
                r.key,
                r.digest,
                r.size,
                r.uncompressed_size,
                r.description,
                r.created_at,
                r.last_used,
                per_digest[r.digest] > 1,
            )
            for r in records
        ]

    def usage(self) -> CacheUsage:
        records = self.index.records()
        sizes = {r.digest: r.size for r in records}
        return CacheUsage(len(records), len(sizes), sum(sizes.values()))

    def prune(
        self,
        keep_storage: int = 0,
        *,
        keep_digests: Iterable[str] = (),
        on_delete: Callable[[str], None] | None = None,
        timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> PruneResult:
        """Drop least-recently-used layers until the blobs take at most `keep_storage` bytes
        (0: everything that may go). Always sweeps temp files, unindexed blobs and rows whose
        blob is gone. Takes the exclusive lock: waits for running builds (up to `timeout`).

        `keep_digests` pins blobs that something outside the index needs (layers and manifests
        of registered images): they are never deleted, their rows are kept, and their size counts
        toward `keep_storage`. `on_delete(digest)` is called after each blob is deleted, for
        whoever keeps derived data beside it (an unpacked copy, say).
        """
        if keep_storage < 0:
            raise CacheError(f"keep_storage must be >= 0, got {keep_storage}")
        pinned = set(keep_digests)
        with self.lock.exclusive(
            purpose="prune",
            timeout=self.lock_timeout if timeout is None else timeout,
            on_wait=on_wait if on_wait is not None else self.on_wait,
        ):
            swept = self.store.sweep_temp(everything=True)
            records = self.index.records()

            def delete_blob(digest: str) -> None:
                if self.store.delete(digest) and on_delete is not None:
                    on_delete(digest)

            # Rows whose blob is gone, or has another size than recorded: forget them.
            on_disk: dict[str, int | None] = {}
            for r in records:
                if r.digest not in on_disk:
                    on_disk[r.digest] = self.store.size(r.digest)
            bad = {r.digest for r in records if on_disk[r.digest] != r.size}
            for d in bad:
                self.index.delete_digest(d)
                if d not in pinned:
                    delete_blob(d)
            records = [r for r in records if r.digest not in bad]
            indexed = {r.digest for r in records}

            # Blobs no row names (a crash between blob and row, a row replaced), unless pinned.
            orphans = 0
            pinned_unindexed = 0
            for d in list(self.store.iter_digests()):
                if d in indexed:
                    continue
                if d in pinned:
                    pinned_unindexed += self.store.size(d) or 0
                    continue
                delete_blob(d)
                orphans += 1

            # LRU: oldest last_used first; a blob goes when its last row goes; pinned stay.
            refs: dict[str, int] = {}
            blob_size: dict[str, int] = {}
            for r in records:
                refs[r.digest] = refs.get(r.digest, 0) + 1
                blob_size[r.digest] = r.size
            total = sum(blob_size.values()) + pinned_unindexed
            removed_entries = removed_blobs = freed = 0
            for r in sorted(records, key=lambda r: (r.last_used, r.key)):
                if total <= keep_storage:
                    break
                if r.digest in pinned:
                    continue
                self.index.delete_keys([r.key])
                removed_entries += 1
                refs[r.digest] -= 1
                if refs[r.digest] == 0:
                    delete_blob(r.digest)
                    removed_blobs += 1
                    freed += blob_size[r.digest]
                    total -= blob_size[r.digest]

            with contextlib.suppress(Exception):
                hasher = self.hasher()
                hasher.prune(STAT_CACHE_MAX_AGE_S)
                hasher.close()

            return PruneResult(removed_entries, removed_blobs, freed, total, swept, orphans)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str | int) -> int:
    """Bytes from `--keep-storage` text: `500MB`, `10GiB`, `2g`, `1024` (plain bytes).

    Every unit is a power of 1024, whether written `GB`, `G` or `GiB`: that is how Docker's
    `--keep-storage` reads them (go-units `RAMInBytes`), so the same flag means the same here.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise CacheError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB; KiB, MiB, GiB, TiB), e.g. 10GB"
        )
    number, unit, _binary, _b = m.groups()
    return int(float(number) * 1024 ** _UNITS[unit.lower()])
