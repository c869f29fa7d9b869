"""Pruning the cache without breaking registered images, and sweeping what crashed builds left
(scratch folders, half-unpacked layers, microVM scratch disks in the temp folder, lock-holder
notes), each only once its owner process is dead.

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
        pid = _pid_of(entry.name[len("tl-vm-"):].split("-")[0])
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

