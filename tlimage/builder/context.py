"""COPY and ADD: choosing files from the build context and laying them out as a layer tree.

Docker's rules, as users rely on them:
- sources are relative to the context folder and may not leave it; `*`, `?` and `[...]` glob;
- a source folder copies its *contents*; a source file keeps its name inside a folder dest;
- dest is a folder when it ends in `/`, when there are several sources (or a glob), or when it
  already is a folder in the image; otherwise it names the file;
- a relative dest resolves against the WORKDIR; missing parents are created (0755, root);
- modes are normalized: folders 0755, files 0755 when the source is executable, else 0644
  (cache keys see only the exec bit, so a copy may not depend on the umask it was made under);
  owners are 0:0 unless `--chown` says otherwise; `--chmod` sets both.
ADD also fetches URLs (verified against `checksum` when given) and unpacks local tar archives.
"""

from __future__ import annotations

import glob
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tlimage.errors import TlimageError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ContextError(TlimageError):
    exit_code = 2


@dataclass(frozen=True)
class Source:
    """A selected source: its path on the host, and the name it is known by in the context."""

    path: Path
    rel: str
    is_glob: bool = False


def select_sources(
    root: Path, patterns: Iterable[str], *, ignored: Callable[[str], bool] = lambda _p: False
) -> list[Source]:
    """Resolve COPY sources against the context `root`. Raises when a source escapes the root or
    matches nothing. `ignored(rel_path)` says whether a context path is excluded
    (.dockerignore, --exclude)."""
    root = root.resolve()
    out: list[Source] = []
    for pattern in patterns:
        rel = posixpath.normpath(pattern.lstrip("/")) if pattern.strip("/") else "."
        if rel == ".." or rel.startswith("../"):
            raise ContextError(f"source {pattern!r} is outside the build context {root}")
        is_glob = any(c in rel for c in "*?[")
        if is_glob:
            matches = sorted(glob.glob(str(root / rel), recursive=False))
            if not matches:
                raise ContextError(f"source {pattern!r} matches no file in {root}")
            for m in matches:
                out.append(Source(Path(m), os.path.relpath(m, root), True))
        else:
            path = root / rel
            if not os.path.lexists(path):
                raise ContextError(f"source {pattern!r} not found in the build context {root}")
            real = path.resolve()
            if real != root and root not in real.parents:
                raise ContextError(f"source {pattern!r} resolves outside the build context")
            out.append(Source(path, rel))
    return [s for s in out if s.rel == "." or not ignored(s.rel)]


def lay_out(
    upper: Path,
    sources: list[Source],
    dest: str,
    *,
    dest_is_dir_in_image: bool,
    ignored: Callable[[str], bool] = lambda _p: False,
    uid: int = 0,
    gid: int = 0,
    chmod: int | None = None,
    unpack_archives: bool = False,
    parents: bool = False,
) -> None:
    """Copy `sources` into the layer tree `upper` at the absolute image path `dest`. With
    `parents` (COPY --parents), each source keeps its context-relative folders under dest."""
    many = len(sources) > 1 or any(s.is_glob for s in sources)
    as_dir = dest.endswith("/") or many or dest_is_dir_in_image or parents
    base = upper / dest.strip("/")
    _make_parents(upper, base if as_dir else base.parent, uid, gid)
    for src in sources:
        target = base
        if parents and posixpath.dirname(src.rel):
            target = base / posixpath.dirname(src.rel)
            _make_parents(upper, target, uid, gid)
        if src.path.is_dir() and not src.path.is_symlink():
            if parents and src.rel != ".":
                target = base / src.rel
                _make_parents(upper, target, uid, gid)
            _copy_tree(src.path, target, ignored, src.rel, uid, gid, chmod)
        elif unpack_archives and src.path.name.endswith(ARCHIVE_SUFFIXES):
            target.mkdir(parents=True, exist_ok=True)
            _unpack(src.path, target)
        else:
            dst = target / src.path.name if as_dir else target
            _copy_one(src.path, dst, uid, gid, chmod)


def write_inline(upper: Path, dest: str, name: str, content: str, mode: int | None,
                 uid: int, gid: int, as_dir: bool) -> None:  # fmt: skip
    target = upper / dest.strip("/")
    dst = target / name if as_dir else target
    _make_parents(upper, dst.parent, uid, gid)
    dst.write_text(content)
    os.chmod(dst, mode if mode is not None else 0o644)
    os.lchown(dst, uid, gid)


def _make_parents(upper: Path, folder: Path, uid: int, gid: int) -> None:
    rel = folder.relative_to(upper)
    cur = upper
    for part in rel.parts:
        cur = cur / part
        if not cur.exists():
            cur.mkdir(mode=0o755)
            os.chmod(cur, 0o755)


def _copy_tree(src: Path, dst: Path, ignored: Callable[[str], bool], rel_base: str, uid: int,
               gid: int, chmod: int | None) -> None:  # fmt: skip
    dst.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        here = Path(dirpath)
        rel_here = here.relative_to(src)
        out_dir = dst / rel_here
        for name in sorted(dirnames):
            rel = posixpath.normpath(posixpath.join(rel_base, str(rel_here), name))
            if ignored(rel):
                dirnames.remove(name)
                continue
            d = out_dir / name
            d.mkdir(exist_ok=True)
            os.chmod(d, chmod if chmod is not None else 0o755)
            os.lchown(d, uid, gid)
        for name in sorted(filenames):
            rel = posixpath.normpath(posixpath.join(rel_base, str(rel_here), name))
            if ignored(rel):
                continue
            _copy_one(here / name, out_dir / name, uid, gid, chmod)
    os.lchown(dst, uid, gid)


def _copy_one(src: Path, dst: Path, uid: int, gid: int, chmod: int | None) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    st = src.lstat()
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst)
        os.chmod(dst, chmod if chmod is not None else _normal_mode(st.st_mode))
    else:
        raise ContextError(f"{src}: only files, folders and symlinks can be copied")
    os.lchown(dst, uid, gid)


def _normal_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


def _unpack(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="tar", numeric_owner=True)
    except tarfile.TarError as e:
        raise ContextError(f"{archive}: cannot unpack archive: {e}") from None


def parse_chmod(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 8)
    except ValueError:
        raise ContextError(
            f"chmod {value!r}: only octal modes (like 755) are supported when copying"
        ) from None
