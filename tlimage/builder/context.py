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
ADD also fetches URLs (verified against `checksum` when given; kept as files, mode 0600, as Docker
does) and unpacks local tar archives (owners, set-id bits and links kept).
All writing goes through `tlimage._fs`: nothing lands or is followed outside the layer tree.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tlimage import _fs
from tlimage.errors import BuildError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ContextError(BuildError):
    exit_code = 2


@dataclass(frozen=True)
class Source:
    """A selected source: the tree it is read from, its real path inside that tree (links
    resolved as if the tree were `/`), the path it was selected by, and the name it keeps in a
    folder destination. `archive` says whether ADD may unpack it (local files only)."""

    root: Path
    real: str
    rel: str
    name: str
    is_glob: bool = False
    archive: bool = True
    mode: int | None = None  # a fixed file mode (downloads: 0600), unless --chmod says

    @property
    def path(self) -> Path:
        return self.root / self.real if self.real else self.root


def select_sources(
    root: Path, patterns: Iterable[str], *, ignored: Callable[[str], bool] = lambda _p: False
) -> list[Source]:
    """Resolve COPY sources inside `root` (the context, or another stage's root filesystem):
    every path and every symlink on the way resolve as if `root` were `/`, so nothing outside
    it is ever read; wildcards (`*`, `?`, `[...]`) match inside it the same way. Raises when a
    source leaves the root or matches nothing. `ignored(rel_path)` says whether a path is
    excluded (.dockerignore, --exclude)."""
    from tlimage.cache.ignore import BadPattern, glob_matcher, go_clean, has_glob

    root = Path(os.path.realpath(root))
    out: list[Source] = []
    for pattern in patterns:
        rel = go_clean(pattern).lstrip("/") or "."
        rel = go_clean(rel)
        if rel == ".." or rel.startswith("../"):
            raise ContextError(f"source {pattern!r} is outside the build context {root}")
        if rel == ".":
            out.append(Source(root, "", ".", root.name))
            continue
        if has_glob(rel):
            try:
                parts = [_matcher(glob_matcher(p)) for p in rel.split("/")]
            except BadPattern as e:
                raise ContextError(f"source {pattern!r}: {e.message}") from None
            matches = _fs.glob_in_root(root, parts)
            if not matches:
                raise ContextError(f"source {pattern!r} matches no file in {root}")
            for shown, real in matches:
                out.append(Source(root, real, shown, posixpath.basename(shown), True))
            continue
        try:
            real = _fs.resolve_in_root(root, rel)
        except FileNotFoundError:
            raise ContextError(f"source {pattern!r} not found in {root}") from None
        except OSError as e:
            raise ContextError(f"source {pattern!r}: {e.strerror}") from None
        out.append(Source(root, real, rel, posixpath.basename(rel)))
    return [s for s in out if s.rel == "." or not ignored(s.rel)]


def _matcher(m: object) -> str | Callable[[str], bool]:
    if isinstance(m, str):
        return m
    return lambda name: m.fullmatch(name) is not None  # type: ignore[attr-defined]


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
    `parents` (COPY --parents), each source keeps its context-relative folders under dest.
    Everything is written through `tlimage._fs` (inside `upper`, never through a link)."""
    many = len(sources) > 1 or any(s.is_glob for s in sources)
    as_dir = dest.endswith("/") or many or dest_is_dir_in_image or parents
    base = dest.strip("/")

    def file_mode(mode: int) -> int:
        return chmod if chmod is not None else _normal_mode(mode)

    dir_mode = chmod if chmod is not None else 0o755
    try:
        with _fs.TreeWriter(upper) as w:
            w.mkdirs(base if as_dir else posixpath.dirname(base))
            for src in sources:
                target = base
                if parents and posixpath.dirname(src.rel):
                    target = _join(base, posixpath.dirname(src.rel))
                    w.mkdirs(target)
                try:
                    st = os.lstat(src.path)
                except OSError as e:
                    raise ContextError(f"source {src.rel!r}: {e.strerror}") from None
                if stat.S_ISDIR(st.st_mode):
                    if parents and src.rel != ".":
                        target = _join(base, src.rel)
                        w.mkdirs(target)
                    _fs.copy_tree(src.root, src.real, w, target, skip=ignored, rel_base=src.rel,
                                  uid=uid, gid=gid, file_mode=file_mode,
                                  dir_mode=dir_mode)  # fmt: skip
                elif unpack_archives and src.archive and src.name.endswith(ARCHIVE_SUFFIXES):
                    w.mkdirs(target)
                    _unpack(src.path, upper, target)
                else:
                    dst = _join(target, src.name) if as_dir else target
                    fixed = src.mode
                    fm = (
                        file_mode if fixed is None or chmod is not None else (lambda _m, f=fixed: f)
                    )
                    _fs.copy_entry(str(src.path), w, dst, uid=uid, gid=gid, file_mode=fm)
    except _fs.UnsafePathError as e:
        raise ContextError(e.message) from None


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def write_inline(upper: Path, dest: str, name: str, content: str, mode: int | None,
                 uid: int, gid: int, as_dir: bool) -> None:  # fmt: skip
    target = dest.strip("/")
    dst = _join(target, name) if as_dir else target
    try:
        data = content.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ContextError(f"inline file {name!r}: cannot encode its text: {e.reason}") from None
    try:
        with _fs.TreeWriter(upper) as w:
            w.mkdirs(posixpath.dirname(dst))
            w.file_bytes(dst, data, mode=mode if mode is not None else 0o644, uid=uid, gid=gid)
    except _fs.UnsafePathError as e:
        raise ContextError(e.message) from None


def make_parents(upper: Path, rel: str) -> None:
    """`mkdir -p rel` inside `upper` (new folders 0755, root-owned)."""
    with _fs.TreeWriter(upper) as w:
        w.mkdirs(rel)


def _normal_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


def _unpack(archive: Path, upper: Path, under: str) -> None:
    """A local archive unpacked at `under` inside `upper`: owners, modes (set-id bits too),
    times and links kept as the archive says, every entry and link inside `upper`."""
    try:
        with open(archive, "rb") as f:
            _fs.extract_tar(f, upper, under=under, same_owner=True, error=ContextError)
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT: the builder reports a full disk
            raise
        raise ContextError(f"{archive.name}: cannot unpack archive: {e.strerror}") from None
    except ContextError as e:
        raise ContextError(f"{archive.name}: cannot unpack archive: {e.message}") from None


def parse_chmod(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 8)
    except ValueError:
        raise ContextError(
            f"chmod {value!r}: only octal modes (like 755) are supported when copying"
        ) from None
