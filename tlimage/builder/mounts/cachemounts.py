"""Cache mounts on the host: one folder per cache identity (id plus what it starts from), its
instances and their locks (see the package's docstring for the layout), and `prune`'s
`clear_cache_mounts`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlimage import _layout, ir
from tlimage._fs import flock_wait, write_atomic
from tlimage.builder.mounts.context import resolve_in
from tlimage.builder.mounts.spec import MountError, Source, context_rel

CACHE_MOUNTS = Path(_layout.CACHE_MOUNTS.path).relative_to(_layout.LAYERS.path)  # below the store


def cache_mounts_root(store_path: Path) -> Path:
    return Path(store_path) / CACHE_MOUNTS


def cache_mount_dir(store_path: Path, cache_id: str, base: str = "") -> Path:
    import xxhash

    h = xxhash.xxh3_128(b"tlimage-cache-mount\0" + cache_id.encode() + b"\0" + base.encode())
    return cache_mounts_root(store_path) / h.hexdigest()


@contextlib.contextmanager
def cache_instance(folder: Path, spec: ir.CacheMount, base: str, seed: Source | None, builder: Any,
                    timeout: float | None) -> Iterator[Path]:  # fmt: skip
    """Lock and return (creating it if needed) the instance of a cache mount this step uses."""
    folder.mkdir(parents=True, exist_ok=True)
    label = folder / "id"
    if not label.exists():
        write_atomic(label, f"{spec.id}\n{base}\n", durable=False)
    n = 0
    while True:
        fd = os.open(folder / f"{n}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if spec.sharing == "private":
            try:
                flock_wait(fd, 0)
            except TimeoutError:
                os.close(fd)
                n += 1
                continue
        break
    try:
        if spec.sharing != "private":
            what = f"cache mount {spec.id!r} ({spec.sharing}), in use by another build"
            told = {"event": "status", "message": f"waiting for {what}"}
            try:
                flock_wait(fd, timeout, lambda: builder.emit(told), shared=spec.sharing == "shared")
            except TimeoutError:
                raise MountError(f"timed out after {timeout:g}s waiting for {what}") from None
        data = folder / str(n)
        if not data.is_dir():
            _create_instance(folder, data, spec, seed, builder)
        yield data
    finally:
        os.close(fd)  # releases the flock


def _create_instance(folder: Path, data: Path, spec: ir.CacheMount, seed: Source | None,
                     builder: Any) -> None:  # fmt: skip
    """Make instance `data` whole or not at all: built beside it, renamed into place under
    `create.lock` so that two builds never both create it."""
    fd = os.open(folder / "create.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if data.is_dir():
            return
        tmp = folder / f".tmp-{os.getpid()}-{data.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if seed is not None:
                _seed(tmp, seed.digests(builder), spec.source, builder.store)
            else:
                tmp.mkdir()
                os.chown(tmp, spec.uid or 0, spec.gid or 0)
                os.chmod(tmp, 0o755 if spec.mode is None else spec.mode)
            os.rename(tmp, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)


def _seed(dest: Path, seed: tuple[str, ...], source: str, store: Any) -> None:
    """`dest` := a copy of the folder `source` of the layers `seed` (a cache mount's
    `from=`). The layers are extracted afresh: the cache will be written to, so nothing may be
    shared with the stored layers."""
    from tlimage.cache.layer import apply_layer, ensure_verified

    root = dest.with_name(dest.name + "-root")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        for digest in seed:
            ensure_verified(store, digest)
            with store.open(digest, verify=True) as f:
                apply_layer(f, root)
        rel = context_rel(source)
        try:
            src = Path(root, resolve_in(str(root), rel)) if rel != "." else root
        except FileNotFoundError:
            raise MountError(f"cache mount source {source!r} not found in its from= "
                             "stage") from None  # fmt: skip
        if not src.is_dir():
            raise MountError(f"cache mount source {source!r} is not a directory")
        os.rename(src, dest)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def clear_cache_mounts(cache_dir: Path | None = None, *, timeout: float | None = None) -> int:
    """Delete every cache mount; returns the bytes freed. Holds the cache's exclusive lock, so
    no build is using one meanwhile."""
    from tlimage.cache.cache import LayerCache

    with LayerCache(cache_dir) as cache:
        root = cache_mounts_root(cache.store.path)
        kw = {} if timeout is None else {"timeout": timeout}
        with cache.lock.exclusive(purpose="clear cache mounts", **kw):
            freed = _du(root)
            shutil.rmtree(root, ignore_errors=True)
            return freed


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
