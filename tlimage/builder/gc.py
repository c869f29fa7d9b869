"""Pruning the cache without breaking registered images or live sandboxes, and sweeping what
crashed builds left (scratch folders, half-unpacked layers, microVM scratch disks in the temp
folder, lock-holder notes), each only once its owner process is dead.

Registered images need their layer blobs and manifests even when no cache row names them any
more, so `prune` pins them (`keep_digests`), with whatever the caller adds (the runtime's live
sandboxes: `tl sbx image prune` passes them in, the builder does not look upwards); a pruned
layer's unpacked copy goes with it. Then the other derived data (the `_layout` buckets marked
evictable: microVM disk images, base trees, guest kits, ADD <url> downloads) is trimmed by the
same size policy, least recently modified first, never an entry a running process holds open
or a live sandbox names. Scratch folders are named after the process that made them and removed
once it is gone.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tlimage import _layout
from tlimage.cache.cache import LayerCache, PruneResult
from tlimage.cache.store import BlobStore, parse_digest, pid_alive
from tlimage.registry import Registry

_STALE_S = 24 * 3600


def pinned_digests() -> set[str]:
    """Layers and manifests of every registered image (a manifest blob is named by the image
    id: both are the xxh3-128 of the manifest bytes)."""
    out: set[str] = set()
    for rec in Registry().list():
        out.update(layer.digest for layer in rec.manifest.layers)
        out.add(f"xxh3:{rec.image_id}")
    return out


@dataclass(frozen=True)
class Evicted:
    """What `prune` removed from the executor's buckets."""

    entries: int = 0
    freed_bytes: int = 0
    remaining_bytes: int = 0


def prune(
    cache_dir: Path | None,
    keep_storage: int,
    *,
    keep_digests: Iterable[str] = (),
    keep_paths: Iterable[Path] = (),
) -> tuple[PruneResult, Evicted]:
    """Layers first (LRU, registered images and `keep_digests` pinned), then the evictable
    buckets until layers and buckets together take at most `keep_storage` bytes (0: all that
    may go). `keep_paths` are files or folders in use elsewhere (live sandboxes)."""
    with LayerCache(cache_dir) as cache:
        unpacked = _layout.UNPACKED.under(cache.store.root)

        def drop_unpacked(digest: str) -> None:
            shutil.rmtree(unpacked / parse_digest(digest), ignore_errors=True)

        result = cache.prune(keep_storage, keep_digests={*pinned_digests(), *keep_digests},
                             on_delete=drop_unpacked)  # fmt: skip
        # Under the exclusive lock: no build is using an image, tree or kit meanwhile.
        with cache.lock.exclusive(purpose="prune", timeout=cache.lock_timeout,
                                  on_wait=cache.on_wait):  # fmt: skip
            evicted = evict(cache.store.root, max(0, keep_storage - result.remaining_bytes),
                            keep_paths)  # fmt: skip
        sweep_scratch(cache.store)
        return result, evicted


def evict(root: Path, budget: int, keep_paths: Iterable[Path] = ()) -> Evicted:
    """Remove entries of the evictable buckets under cache `root`, oldest first, until they take
    at most `budget` bytes. Kept: entries open in a running process or named in `keep_paths`,
    and entries being made (dot-named)."""
    keep = {os.path.realpath(p) for p in keep_paths}
    open_files = _open_files()
    entries: list[tuple[float, int, Path, bool]] = []  # (mtime, size, path, removable)
    for bucket in _layout.EVICTABLE:
        folder = bucket.under(root)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                mtime = entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            size, inodes = _usage(entry)
            real = os.path.realpath(entry)
            held = bool(inodes & open_files) or any(
                k == real or k.startswith(real + os.sep) for k in keep
            )
            entries.append((mtime, size, entry, not held))
    total = sum(e[1] for e in entries)
    removed = freed = 0
    for _mtime, size, path, removable in sorted(entries, key=lambda e: (e[0], str(e[2]))):
        if total <= budget:
            break
        if not removable:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            removed += 1
            freed += size
            total -= size
    return Evicted(removed, freed, total)


def _usage(path: Path) -> tuple[int, set[tuple[int, int]]]:
    """Bytes on disk and the (device, inode) of each regular file under `path`."""
    size = 0
    inodes: set[tuple[int, int]] = set()
    paths = [path] if not path.is_dir() or path.is_symlink() else None
    if paths is None:
        paths = [Path(d, f) for d, _ds, fs in os.walk(path) for f in fs]
    for p in paths:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        size += st.st_blocks * 512
        inodes.add((st.st_dev, st.st_ino))
    return size, inodes


def _open_files() -> set[tuple[int, int]]:
    """(device, inode) of every file a process on this host has open (that we may see)."""
    out: set[tuple[int, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def scratch_name(prefix: str) -> str:
    """A scratch folder prefix that records its owner, for `sweep_scratch`."""
    return f"{prefix}{os.getpid()}-"


def sweep_scratch(store: BlobStore) -> int:
    """Remove scratch and half-unpacked folders whose process is gone (or that are older than a
    day, in case of pid reuse). Returns how many were removed."""
    removed = 0
    now = time.time()
    for folder, prefix in ((Path(store.path) / "tmp", "tlimage-"),
                           (_layout.UNPACKED.under(store.root), ".tmp-")):  # fmt: skip
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
    removed += sweep_lock_notes(Path(store.path))
    removed += sweep_vm_scratch()
    return removed


def sweep_lock_notes(cache_path: Path) -> int:
    """Remove lock-holder notes (`*.holders/<pid>-*.json|.tmp`) of processes that are gone."""
    removed = 0
    for holders in cache_path.glob("*.holders"):
        try:
            notes = list(holders.iterdir())
        except OSError:
            continue
        for note in notes:
            pid = _pid_of(note.name.split("-")[0])
            if pid is None or pid_alive(pid):
                continue
            try:
                note.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def sweep_vm_scratch(tmp_root: str | None = None) -> int:
    """Remove microVM scratch folders (`<tmp>/tl-vm-<pid>-*`, each holding a large sparse disk
    image) whose owner process is dead and that no running process names on its command line
    (a QEMU still using it). Older unnamed `tl-vm-*` folders count as owned by whoever names
    them. Returns how many were removed."""
    import tempfile

    root = Path(tmp_root or tempfile.gettempdir())
    try:
        entries = [e for e in root.iterdir() if e.name.startswith("tl-vm-") and e.is_dir()
                   and not e.is_symlink()]  # fmt: skip
    except OSError:
        return 0
    if not entries:
        return 0
    in_use = _cmdline_mentions([str(e) for e in entries])
    removed = 0
    for entry in entries:
        pid = _pid_of(entry.name[len("tl-vm-") :].split("-")[0])
        if pid is not None and pid_alive(pid):
            continue
        if str(entry) in in_use:
            continue
        if pid is None and _age(entry) < 300:
            continue  # unnamed and new: perhaps a VM still starting
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _cmdline_mentions(paths: list[str]) -> set[str]:
    """Which of `paths` appear in some running process's command line."""
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set(paths)  # cannot tell: treat all as in use
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        for p in paths:
            if p in cmd:
                found.add(p)
    return found


def nearly_full(path: object) -> str | None:
    """The mount point holding `path` when its filesystem is (nearly) full, else None."""
    try:
        p = os.fspath(path)  # type: ignore[arg-type]
        st = os.statvfs(p)
    except (OSError, TypeError):
        return None
    if st.f_bavail * st.f_frsize < max(8 << 20, st.f_blocks * st.f_frsize // 100):
        return _mount_point(p)
    return None


def full_folder(candidates: list[object]) -> str:
    """The mount point of the first candidate folder whose filesystem is (nearly) full, else of
    the first candidate: what a disk-full error names."""
    folders: list[str] = []
    for c in candidates:
        if not c:
            continue
        p = os.path.abspath(os.fspath(c))  # type: ignore[arg-type]
        while p != "/" and not os.path.isdir(p):
            p = os.path.dirname(p)
        folders.append(p)
    for p in folders:
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < max(8 << 20, st.f_blocks * st.f_frsize // 100):
            return _mount_point(p)
    return _mount_point(folders[0]) if folders else "the cache folder"


def _mount_point(path: str) -> str:
    p = os.path.abspath(path)
    while p != "/" and not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _pid_of(name: str) -> int | None:
    for part in name.split("-"):
        if part.isdigit():
            return int(part)
    return None
