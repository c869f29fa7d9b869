"""Overlay-style uppers and layers on the host: the form every backend promises for a step's
changes (`normalize_upper`), and applying an upper onto a host folder (`apply_upper`).

A layer is overlayfs' upper format: a whiteout is a 0:0 character device, an opaque directory
carries `trusted.overlay.opaque=y`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

OPAQUE_XATTR = "trusted.overlay.opaque"


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below root (root itself as "."), parents before children, names sorted."""
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        st = os.lstat(path)
        yield rel or ".", st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), reverse=True)
            stack.extend(os.path.join(rel, n) if rel else n for n in names)


def xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        with contextlib.suppress(OSError):
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
    return out


def normalize_upper(upper: Path, lowers: tuple[Path, ...] = ()) -> tuple[str, ...]:
    """Puts an upper into the form every backend promises; returns its opaque directories
    (relative paths, "." for the root), sorted.

    - Whiteouts that share an inode (overlayfs links them to one) get one inode each.
    - Empty directories that are only copy-up artefacts are removed: not opaque, and the same
      mode, owner and xattrs as the directory the lowers show at that path. Such a directory
      appears when a step (or the sandbox's own resolv.conf placeholder) creates and deletes
      something inside it; only its mtime differs, and layers do not keep mtimes. BuildKit's
      overlay differ skips the same directories.
    """
    opaque: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(upper, topdown=False):
        rel = os.path.relpath(dirpath, upper)
        is_opaque = False
        try:
            is_opaque = os.getxattr(dirpath, OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            pass
        if is_opaque:
            opaque.append(rel)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_nlink > 1:
                os.unlink(p)
                os.mknod(p, stat.S_IFCHR | 0o000, 0)
        if rel != "." and not is_opaque and not os.listdir(dirpath):
            below = _lower_dir(lowers, rel)
            if below is not None and _same_dir_meta(dirpath, below):
                os.rmdir(dirpath)
    return tuple(sorted(opaque))


def _lower_dir(lowers: tuple[Path, ...], rel: str) -> str | None:
    """The directory the lowers show at `rel` (topmost wins), or None if they show none."""
    for lower in reversed(lowers):
        p = os.path.join(lower, rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return None
        return p if stat.S_ISDIR(st.st_mode) else None
    return None


def _same_dir_meta(a: str, b: str) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    return _plain_xattrs(a) == _plain_xattrs(b)


def _plain_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in names
        if not n.startswith("trusted.overlay.")
    }


def apply_upper(upper: Path, dest: Path) -> None:
    """Applies an overlay-style upper (whiteouts delete, opaque folders replace) onto the host
    folder `dest`, moving its files in. Parents come before children and each is made a real
    folder first, so nothing is ever written through a symlink found in `dest`."""
    from tlimage._fs import lay_out_layers

    lay_out_layers([upper], dest, place="move", dir_times=False, dir_xattrs=False)
