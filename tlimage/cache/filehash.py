"""Digests of build-context files for cache keys.

`digest_tree(context, sources, ignore)` is what a COPY/ADD step's key gets for its files. It covers,
for every selected entry: the path relative to the context, the file type, the executable bit,
the bytes of regular files and the target of symlinks. It deliberately does not cover mtime,
atime/ctime, owner, group or the other permission bits (they vary with checkouts and umask and
would turn every fresh clone into a cache miss), so whoever copies the files must normalize what
the digest leaves out (files 0644 or 0755 by their exec bit, directories 0755, owner as the step
says); otherwise a cached layer could differ from a fresh one.

Selection follows Docker's COPY: each source is a path or a `filepath.Match` wildcard relative to
the context root (a leading `/` means the root; `..` may not leave it); a directory brings its
whole subtree; `.dockerignore` rules (ignore.py) filter everything, and a path they exclude does not
exist for COPY. A source that is itself a symlink is followed (its target must stay inside the
context; absolute targets resolve against the context root); symlinks below a selected
directory are kept as symlinks. Only selected files are opened.

File bytes are hashed with xxh3-128. `FileHasher` keeps a stat cache in SQLite (path, size,
mtime_ns, ctime_ns, inode, device -> digest) so an unchanged large context is stat()ed, not read.
An entry is only trusted when the file's mtime and ctime were older than the moment of hashing by
more than `racy_window_ns` (git's "racily clean" rule): a file rewritten within the same
timestamp tick as its hashing is hashed again next time instead of being served stale.
"""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from tlimage import _layout
from tlimage.cache.ignore import IgnoreMatcher, glob_matcher, go_clean, has_glob
from tlimage.errors import CacheError

STAT_DB = Path(_layout.FILEHASH.path) / "stat.db"
TREE_FORMAT = b"tlimage-tree-v1\0"
DEFAULT_RACY_WINDOW_NS = 1_000_000_000  # above any local filesystem's timestamp granularity

_SMALL = 1 << 20
_CHUNK = 1 << 20
_SYMLINK_HOPS = 40


class ContextPathError(CacheError):
    """A COPY/ADD source that does not exist in the context, is excluded, or leaves it. The
    caller (who knows the step's source location) adds where it was written."""

    def __init__(self, source: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{source!r}: {reason}", hint=hint)
        self.source = source
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TreeEntry:
    path: str  # relative to the context, '/'-separated; "" is the context root itself
    kind: str  # f file, d directory, l symlink, p fifo, c/b device, s socket
    executable: bool  # regular files: any execute bit set; False for everything else
    payload: str  # files: xxh3-128 hex of the bytes; symlinks: the target; else ""

    @property
    def token(self) -> str:
        """`<kind><x|->:<payload>`, the manifest value for this entry."""
        return f"{self.kind}{'x' if self.executable else '-'}:{self.payload}"


@dataclass(frozen=True, slots=True)
class TreeDigest:
    digest: str  # "xxh3:<hex>" over the canonical encoding of `entries`
    entries: tuple[TreeEntry, ...]  # sorted by the bytes of their paths
    files_hashed: int = 0  # files read from disk for this digest
    files_cached: int = 0  # files served by the stat cache
    bytes_hashed: int = 0

    def manifest(self) -> dict[str, str]:
        """path -> token, JSON-friendly; what `--explain` keeps to name changed files later."""
        return {e.path: e.token for e in self.entries}


@dataclass(frozen=True, slots=True)
class ManifestChange:
    path: str
    change: str  # "added", "removed", "modified", "type", "mode"
    old: str | None
    new: str | None

    def __str__(self) -> str:
        what = {
            "added": "added",
            "removed": "removed",
            "modified": "content changed",
            "type": "type changed",
            "mode": "executable bit changed",
        }[self.change]
        return f"{self.path or '.'}: {what}"


def diff_manifests(old: Mapping[str, str], new: Mapping[str, str]) -> list[ManifestChange]:
    """What changed between two `TreeDigest.manifest()`s, sorted by path."""
    out: list[ManifestChange] = []
    for path in sorted(old.keys() | new.keys(), key=lambda p: p.encode("utf-8", "surrogateescape")):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None:
            change = "added"
        elif b is None:
            change = "removed"
        elif a[0] != b[0]:
            change = "type"
        elif a[1] != b[1] and a[2:] == b[2:]:
            change = "mode"
        else:
            change = "modified"
        out.append(ManifestChange(path, change, a, b))
    return out


# ----------------------------------------------------------------------------------------------
# File hashing with a stat cache


def hash_file(path: str | os.PathLike[str]) -> str:
    """xxh3-128 hex of a file's bytes (no cache)."""
    return _read_hash(os.fspath(path))[0]


def _read_hash(path: str) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        data = os.read(fd, _SMALL)
        if len(data) < _SMALL:
            rest = os.read(fd, _SMALL)
            if not rest:
                return xxhash.xxh3_128_hexdigest(data), len(data)
            data += rest
        h = xxhash.xxh3_128(data)
        total = len(data)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with io.FileIO(fd, "rb", closefd=False) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                total += n
        return h.hexdigest(), total
    finally:
        os.close(fd)


class FileHasher:
    """Hashes files, remembering digests by (path, size, mtime_ns, ctime_ns, inode, device).

    With `db_path=None` the cache lives in memory for this object only. Writes to the database
    are batched and made by `flush()` (called by `digest_tree`); it is a cache, so a failure to
    write it (database locked by another build for too long) loses speed, never correctness.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        racy_window_ns: int = DEFAULT_RACY_WINDOW_NS,
    ) -> None:
        self.db_path = Path(db_path) if db_path is not None else None
        self.racy_window_ns = racy_window_ns
        self._db: sqlite3.Connection | None = None
        self._mem: dict[bytes, tuple[int, int, int, int, int, str]] = {}
        self._loaded: list[bytes] = []
        self._pending: list[tuple] = []
        self.files_hashed = 0
        self.files_cached = 0
        self.bytes_hashed = 0

    @classmethod
    def for_cache(cls, cache_dir: str | os.PathLike[str] | None = None, **kw) -> FileHasher:
        """The hasher whose stat cache lives in the cache root (`<root>/filehash-v1/stat.db`)."""
        from tlimage.cache.store import ensure_cache_root, resolve_cache_root

        root = resolve_cache_root(cache_dir)
        ensure_cache_root(root)
        return cls(root / STAT_DB, **kw)

    def _conn(self) -> sqlite3.Connection | None:
        if self.db_path is None:
            return None
        if self._db is None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            from tlimage.cache.index import connect_wal

            db = connect_wal(self.db_path, 5.0)
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER,"
                " mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER, dev INTEGER,"
                " digest TEXT, hashed_at INTEGER) WITHOUT ROWID"
            )
            self._db = db
        return self._db

    def preload(self, directory: str | os.PathLike[str]) -> None:
        """Load every cached entry under `directory` with one query (instead of one per file)."""
        prefix = os.fsencode(os.path.join(os.fspath(directory), ""))
        if any(prefix.startswith(p) for p in self._loaded):
            return
        db = self._conn()
        self._loaded.append(prefix)
        if db is None:
            return
        upper = prefix[:-1] + bytes([prefix[-1] + 1])
        rows = db.execute(
            "SELECT path, size, mtime_ns, ctime_ns, ino, dev, digest FROM files"
            " WHERE path >= ? AND path < ?",
            (prefix, upper),
        )
        self._mem.update((row[0], row[1:]) for row in rows)

    def _lookup(self, key: bytes) -> tuple | None:
        hit = self._mem.get(key)
        if hit is not None or any(key.startswith(p) for p in self._loaded):
            return hit
        db = self._conn()
        if db is None:
            return None
        row = db.execute(
            "SELECT size, mtime_ns, ctime_ns, ino, dev, digest FROM files WHERE path = ?", (key,)
        ).fetchone()
        return tuple(row) if row else None

    def hash_file(self, path: str, st: os.stat_result | None = None) -> str:
        """xxh3-128 hex of the regular file at `path` (absolute), from the cache when its stat
        matches. `st` is its lstat when the caller already has it."""
        if st is None:
            st = os.lstat(path)
        key = os.fsencode(path)
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        hit = self._lookup(key)
        if hit is not None and hit[:5] == sig:
            self.files_cached += 1
            return hit[5]
        now = time.time_ns()
        digest, n = _read_hash(path)
        self.files_hashed += 1
        self.bytes_hashed += n
        if max(st.st_mtime_ns, st.st_ctime_ns) < now - self.racy_window_ns and n == st.st_size:
            self._mem[key] = (*sig, digest)
            self._pending.append((key, *sig, digest, now))
        else:
            self._mem.pop(key, None)
        return digest

    def flush(self) -> None:
        """Write new entries to the database (one transaction)."""
        if not self._pending:
            return
        db = self._conn()
        pending, self._pending = self._pending, []
        if db is None:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?)", pending)
            db.execute("COMMIT")
        except sqlite3.OperationalError:
            if db.in_transaction:
                db.execute("ROLLBACK")

    def prune(self, older_than_s: float) -> int:
        """Forget entries hashed more than `older_than_s` seconds ago; returns how many."""
        db = self._conn()
        if db is None:
            return 0
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        cur = db.execute("DELETE FROM files WHERE hashed_at < ?", (cutoff,))
        return cur.rowcount

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> FileHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Tree digests


def digest_tree(
    context_dir: str | os.PathLike[str],
    patterns: Sequence[str] = (".",),
    ignore: IgnoreMatcher | Iterable[str] | None = None,
    *,
    hasher: FileHasher | None = None,
    allow_empty: bool = False,
) -> TreeDigest:
    """The digest of the files `patterns` select from `context_dir` (see the module docstring).

    Raises ContextPathError when a source is missing or excluded (or, unless `allow_empty`, a
    wildcard matches nothing) or leaves the context; BadPattern for a malformed wildcard.
    """
    ctx = os.path.realpath(os.fspath(context_dir))
    if not os.path.isdir(ctx):
        raise ContextPathError(os.fspath(context_dir), "the build context is not a directory")
    matcher = ignore if isinstance(ignore, IgnoreMatcher) else IgnoreMatcher(ignore or ())
    hasher = hasher if hasher is not None else FileHasher(None)
    before = (hasher.files_hashed, hasher.files_cached, hasher.bytes_hashed)
    hasher.preload(ctx)
    walker = _Walker(ctx, matcher, hasher)
    try:
        for pattern in patterns:
            walker.source(pattern, allow_empty)
    finally:
        hasher.flush()

    entries = sorted(walker.entries.values(), key=lambda e: _fsbytes(e.path))
    # Per entry: kind, x or -, path, NUL, payload, NUL. Neither a path nor a symlink target can
    # hold a NUL, so the encoding is unambiguous.
    h = xxhash.xxh3_128(TREE_FORMAT)
    h.update(
        b"".join(
            b"%s%s%s\0%s\0"
            % (
                e.kind.encode(),
                b"x" if e.executable else b"-",
                _fsbytes(e.path),
                _fsbytes(e.payload),
            )
            for e in entries
        )
    )
    return TreeDigest(
        "xxh3:" + h.hexdigest(),
        tuple(entries),
        hasher.files_hashed - before[0],
        hasher.files_cached - before[1],
        hasher.bytes_hashed - before[2],
    )


def _fsbytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _Walker:
    def __init__(self, ctx: str, matcher: IgnoreMatcher, hasher: FileHasher) -> None:
        self.ctx = ctx
        self.matcher = matcher
        self.hasher = hasher
        self.entries: dict[str, TreeEntry] = {}

    # -- sources ------------------------------------------------------------------------------

    def source(self, pattern: str, allow_empty: bool) -> None:
        raw = pattern
        cleaned = go_clean(pattern)
        if cleaned.startswith("/"):
            cleaned = go_clean(cleaned.lstrip("/") or ".")
        if cleaned == ".." or cleaned.startswith("../"):
            raise ContextPathError(raw, "is outside the build context")
        if cleaned == ".":
            self.add("", "", None)
            return
        parts = cleaned.split("/")
        if not has_glob(cleaned):
            real = self._resolve(parts, raw)
            if not self.add(cleaned, real, None):
                raise ContextPathError(
                    raw,
                    "is excluded by the ignore file (.dockerignore)",
                    hint="remove it from .dockerignore or add a '!' exception",
                )
            return
        found = 0
        for display, real in self._glob(parts, raw):
            if self.add(display, real, None):
                found += 1
        if not found and not allow_empty:
            raise ContextPathError(raw, "no files in the build context match this wildcard")

    def _resolve(self, parts: list[str], raw: str, follow_last: bool = True) -> str:
        """The real relative path for `parts`, following symlinks as if the context were the
        root. Raises ContextPathError when something on the way does not exist."""
        from tlimage._fs import resolve_in_root

        try:
            return resolve_in_root(self.ctx, "/".join(parts), follow_last=follow_last)
        except FileNotFoundError:
            raise ContextPathError(raw, "not found in the build context") from None
        except OSError:
            raise ContextPathError(raw, "too many levels of symbolic links") from None

    def _glob(self, parts: list[str], raw: str) -> list[tuple[str, str]]:
        """(display path, real path) of everything matching the wildcard components."""
        matchers = [glob_matcher(p) for p in parts]
        level: list[tuple[str, str]] = [("", "")]
        for depth, m in enumerate(matchers):
            last = depth == len(matchers) - 1
            nxt: list[tuple[str, str]] = []
            for display, real in level:
                base = os.path.join(self.ctx, real) if real else self.ctx
                if isinstance(m, str):
                    names = [m] if os.path.lexists(os.path.join(base, m)) else []
                else:
                    try:
                        names = [n for n in os.listdir(base) if m.fullmatch(n)]
                    except (NotADirectoryError, FileNotFoundError):
                        continue
                for name in sorted(names, key=os.fsencode):
                    d = f"{display}/{name}" if display else name
                    r = f"{real}/{name}" if real else name
                    if not last:
                        try:
                            r = self._resolve(r.split("/"), raw)
                        except ContextPathError:
                            continue
                        if not os.path.isdir(os.path.join(self.ctx, r)):
                            continue
                    else:
                        try:
                            r = self._resolve(r.split("/"), raw)
                        except ContextPathError:
                            continue  # a dangling symlink matched: nothing to copy
                    nxt.append((d, r))
            level = nxt
        return level

    # -- entries ------------------------------------------------------------------------------

    def add(self, display: str, real: str, parent_hits: list[bool] | None) -> bool:
        """Record `real` (and its subtree) under `display`. False when the ignore rules leave
        nothing of it."""
        hits: list[bool] | None = None
        if real and self.matcher:
            excluded, hits = self.matcher.evaluate(real, parent_hits)
        else:
            excluded = False
        path = os.path.join(self.ctx, real) if real else self.ctx
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if excluded and not self.matcher.has_exclusions:
                return False
            any_child = self._children(display, real, path, hits)
            if excluded and not any_child:
                return False
            if display:
                self.entries[display] = TreeEntry(display, "d", False, "")
            return True
        if excluded:
            return False
        self.entries[display] = self._entry(display, path, st)
        return True

    def _children(self, display: str, real: str, path: str, hits: list[bool] | None) -> bool:
        any_child = False
        with os.scandir(path) as it:
            children = list(it)  # no need to sort: digest_tree sorts all entries once
        matcher = self.matcher
        for child in children:
            name = child.name
            c_real = f"{real}/{name}" if real else name
            c_disp = f"{display}/{name}" if display else name
            st = child.stat(follow_symlinks=False)
            if matcher:
                excluded, c_hits = matcher.evaluate(c_real, hits)
            else:
                excluded, c_hits = False, None
            if stat.S_ISDIR(st.st_mode):
                if excluded and not matcher.has_exclusions:
                    continue
                inner = self._children(c_disp, c_real, child.path, c_hits)
                if excluded and not inner:
                    continue
                self.entries[c_disp] = TreeEntry(c_disp, "d", False, "")
                any_child = True
                continue
            if excluded:
                continue
            self.entries[c_disp] = self._entry(c_disp, child.path, st)
            any_child = True
        return any_child

    def _entry(self, display: str, path: str, st: os.stat_result) -> TreeEntry:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            digest = self.hasher.hash_file(path, st)
            return TreeEntry(display, "f", bool(mode & 0o111), digest)
        if stat.S_ISLNK(mode):
            return TreeEntry(display, "l", False, os.readlink(path))
        if stat.S_ISFIFO(mode):
            return TreeEntry(display, "p", False, "")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "c" if stat.S_ISCHR(mode) else "b"
            return TreeEntry(display, kind, False, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        return TreeEntry(display, "s", False, "")
