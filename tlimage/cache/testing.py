"""Helpers for tests of the cache and of its consumers: build trees from a spec, snapshot them.

`snapshot_tree` is the equality used by "apply(layer(tree)) reproduces the tree": it covers
everything a layer carries (type, permission bits, owner, bytes, link targets, device numbers,
hard-link groups, kept xattrs) and nothing it deliberately drops (times, inode numbers).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True, slots=True)
class Entry:
    """One item of a tree spec. `kind` is file, dir, symlink, hardlink, fifo, whiteout or opaque
    (the last two only make sense in an overlay upper directory)."""

    kind: str
    path: str
    data: bytes = b""
    mode: int | None = None
    target: str = ""
    uid: int = 0
    gid: int = 0


def make_tree(root: str | os.PathLike[str], entries: Iterable[Entry], *, mtime: int = 0) -> None:
    """Create `entries` under `root` in the given order (parents are created as needed, 0o755).

    Every mode is set with chmod, so the process umask does not leak into the tree; owners are
    set when running as root.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    as_root = os.geteuid() == 0
    dirs: list[tuple[str, int]] = []
    for e in entries:
        path = os.path.join(root, e.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = e.mode
        if e.kind == "file":
            with open(path, "wb") as f:
                f.write(e.data)
            mode = 0o644 if mode is None else mode
        elif e.kind == "dir":
            os.makedirs(path, exist_ok=True)
            dirs.append((path, 0o755 if mode is None else mode))
        elif e.kind == "symlink":
            os.symlink(e.target, path)
        elif e.kind == "hardlink":
            os.link(os.path.join(root, e.target), path)
        elif e.kind == "fifo":
            os.mkfifo(path)
            mode = 0o644 if mode is None else mode
        elif e.kind == "whiteout":
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        elif e.kind == "opaque":
            os.makedirs(path, exist_ok=True)
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        else:
            raise ValueError(f"unknown entry kind {e.kind!r}")
        # chown before chmod: chown clears set-id bits
        if as_root and e.kind not in ("hardlink", "whiteout"):
            os.lchown(path, e.uid, e.gid)
        if e.kind in ("file", "fifo"):
            os.chmod(path, mode)
        if e.kind not in ("symlink", "hardlink", "dir", "opaque"):
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    # Directories made implicitly get 0o755 too, so the process umask never shows in the tree.
    explicit = {path for path, _ in dirs}
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if path not in explicit and not os.path.islink(path):
                os.chmod(path, 0o755)
    for path, mode in dirs:
        os.chmod(path, mode)


def snapshot_tree(root: str | os.PathLike[str], *, owners: bool = True) -> dict[str, tuple]:
    """rel path -> (kind, mode, uid, gid, payload, link group, xattrs); the root is excluded."""
    root = os.fspath(root)
    out: dict[str, tuple] = {}
    first_of_inode: dict[tuple[int, int], str] = {}
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rels.append(os.path.relpath(os.path.join(dirpath, name), root))
    for rel in sorted(rels, key=os.fsencode):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        m = st.st_mode
        group = ""
        if stat.S_ISDIR(m):
            kind, payload = "dir", ""
        elif stat.S_ISREG(m):
            with open(path, "rb") as f:
                kind, payload = "file", xxhash.xxh3_128_hexdigest(f.read())
        elif stat.S_ISLNK(m):
            kind, payload = "symlink", os.readlink(path)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            kind = "chr" if stat.S_ISCHR(m) else "blk"
            payload = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        elif stat.S_ISFIFO(m):
            kind, payload = "fifo", ""
        else:
            kind, payload = "other", ""
        if not stat.S_ISDIR(m) and st.st_nlink > 1:
            group = first_of_inode.setdefault((st.st_dev, st.st_ino), rel)
        xattrs: tuple = ()
        if not stat.S_ISLNK(m):
            try:
                names = sorted(n for n in os.listxattr(path) if n.startswith("user."))
                xattrs = tuple((n, os.getxattr(path, n)) for n in names)
            except OSError:
                pass
        uid, gid = (st.st_uid, st.st_gid) if owners else (0, 0)
        mode = 0 if stat.S_ISLNK(m) else stat.S_IMODE(m)
        out[rel] = (kind, mode, uid, gid, payload, group, xattrs)
    return out
