"""The content-addressed blob store under the cache root.

Layout (the folder name carries the format version; a change to it bumps the name, never migrates):

    <root>/                       TLIMAGE_CACHE_DIR, else $XDG_CACHE_HOME/tlimage, else ~/.cache/tlimage
      CACHEDIR.TAG                marks the tree as a cache for backup tools (bford.info/cachedir)
      layers-v1/
        blobs/xxh3/<32 hex>       one file per blob, named by the xxh3-128 of its bytes
        blobs/xxh3/.tmp-<pid>-<r> a blob being written; renamed into place once complete
        index.db                  key -> layer rows (index.py)
        lock                      builds hold it shared, prune exclusively (lock.py)

A digest is written `xxh3:<32 lowercase hex>`. The blob folder is flat, not sharded: a temp file is
created in the folder its blob will live in, so `os.replace` never crosses a directory, and ext4/xfs
keep large folders indexed (a cache holds thousands of layers, not billions).

Invariants:
- A blob file at its final name is complete and was fsynced before the rename; a crash leaves at
  most a `.tmp-*` file, which `sweep_temp` removes once its writer is gone.
- Readers never trust a name alone when asked to verify: a blob whose bytes do not hash to its
  name is unlinked and reported as `CorruptBlob`, never returned.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash

from tlimage import _layout
from tlimage._fs import write_atomic
from tlimage.errors import CacheError

CACHE_DIR_ENV = "TLIMAGE_CACHE_DIR"
LAYOUT = _layout.LAYERS.path
ALGO = "xxh3"
_HEX_LEN = 32

CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by tlimage.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)

_TMP_PREFIX = ".tmp-"
# A temp file older than this is swept even if a process with its pid exists (pid reuse, or a
# writer in another pid namespace sharing the cache).
_TMP_MAX_AGE_S = 24 * 3600
_CHUNK = 1 << 20


class CorruptBlob(CacheError):
    """A blob's bytes do not hash to its name. The blob has been discarded."""

    def __init__(self, digest: str, path: Path, actual: str) -> None:
        super().__init__(
            f"cache blob {digest} is corrupt (its bytes hash to {actual}); it was discarded",
            hint="the step that produced it will run again on the next build",
        )
        self.digest = digest
        self.path = path
        self.actual = actual


class BlobNotFound(CacheError):
    def __init__(self, digest: str, path: Path) -> None:
        super().__init__(f"cache blob {digest} is missing ({path})")
        self.digest = digest
        self.path = path


def default_cache_root() -> Path:
    """`$TLIMAGE_CACHE_DIR`, else `$XDG_CACHE_HOME/tlimage`, else `~/.cache/tlimage`.

    A relative XDG_CACHE_HOME is ignored, as the XDG base-directory spec requires.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "tlimage"


def resolve_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: the argument (the CLI's `--cache-dir`) when given, else the default."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser().absolute()
    return default_cache_root().absolute()


def format_digest(hexdigest: str) -> str:
    return f"{ALGO}:{hexdigest}"


def parse_digest(digest: str) -> str:
    """The hex part of `xxh3:<hex>`; raises CacheError for anything else."""
    algo, sep, hexpart = digest.partition(":")
    if (
        sep != ":"
        or algo != ALGO
        or len(hexpart) != _HEX_LEN
        or any(c not in "0123456789abcdef" for c in hexpart)
    ):
        raise CacheError(
            f"invalid blob digest {digest!r}: expected '{ALGO}:' and {_HEX_LEN} lowercase hex digits"
        )
    return hexpart


def ensure_cache_root(root: Path) -> None:
    """Create the root and its CACHEDIR.TAG (atomically; concurrent callers are fine)."""
    from tlimage._private import private_dir

    private_dir(root)  # image trees and build scratch live below: other host users stay out
    tag = root / "CACHEDIR.TAG"
    if not tag.exists():
        atomic_write_bytes(tag, CACHEDIR_TAG.encode())


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` through a temp file in the same folder and `os.replace`."""
    write_atomic(path, data, durable=durable)  # named .tmp-<pid>-…, as sweep_temp expects
    if durable:
        _fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: str
    size: int
    existed: bool = field(default=False, compare=False)  # the store had it before this write


class BlobStore:
    """Blobs named by the xxh3-128 of their bytes, under `<root>/layers-v1/blobs/xxh3/`."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_cache_root(root)
        self.path = self.root / LAYOUT
        self.blobs_dir = self.path / "blobs" / ALGO
        ensure_cache_root(self.root)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # -- naming -------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / parse_digest(digest)

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def size(self, digest: str) -> int | None:
        """The blob's size in bytes, or None when it is absent."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def iter_digests(self) -> Iterator[str]:
        """Every complete blob in the store (temp files excluded)."""
        with os.scandir(self.blobs_dir) as it:
            for entry in it:
                if entry.name.startswith(".") or len(entry.name) != _HEX_LEN:
                    continue
                yield format_digest(entry.name)

    # -- writing ------------------------------------------------------------------------------

    def writer(self) -> BlobWriter:
        """A writer for one new blob: `write()` bytes, then `commit()` for its `BlobRef`."""
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> BlobRef:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def put_file(self, path: str | os.PathLike[str]) -> BlobRef:
        with self.writer() as w, open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                w.write(chunk)
            return w.commit()

    # -- reading ------------------------------------------------------------------------------

    def open(self, digest: str, *, verify: bool = False) -> BinaryIO:
        """Open a blob for reading.

        With `verify=True` the reader hashes what it returns; reading to the end of a blob whose
        bytes do not match its name discards the blob and raises `CorruptBlob` instead of the
        final empty read, so a consumer that reads to EOF never silently accepts bad data.
        """
        path = self.blob_path(digest)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(digest, path) from None
        if not verify:
            return f
        return _VerifyingReader(f, self, digest, path)  # type: ignore[return-value]

    def read_bytes(self, digest: str, *, verify: bool = True) -> bytes:
        with self.open(digest, verify=verify) as f:
            data = f.read()
            f.read()  # the EOF read is where verification happens
        return data

    def verify(self, digest: str) -> bool:
        """Hash the whole blob. A blob that does not match is discarded; False if bad or absent."""
        try:
            with self.open(digest, verify=True) as f:
                while f.read(_CHUNK):
                    pass
        except (CorruptBlob, BlobNotFound):
            return False
        return True

    # -- removal ------------------------------------------------------------------------------

    def delete(self, digest: str) -> bool:
        return _unlink_quiet(self.blob_path(digest))

    def _discard_if_same(self, path: Path, st: os.stat_result) -> None:
        """Unlink `path` only if it is still the inode that was read (a concurrent writer may
        have replaced it with a good copy meanwhile)."""
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            _unlink_quiet(path)

    def sweep_temp(self, *, everything: bool = False) -> int:
        """Remove temp files left by writers that died. With `everything=True` (only under the
        exclusive lock, when no writer can be running) remove all of them. Returns the count."""
        removed = 0
        now = time.time()
        for folder in (self.blobs_dir, self.path, self.root):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not entry.name.startswith(_TMP_PREFIX):
                    continue
                if not everything:
                    pid = _tmp_owner(entry.name)
                    try:
                        age = now - entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    if pid is not None and pid_alive(pid) and age < _TMP_MAX_AGE_S:
                        continue
                if _unlink_quiet(Path(entry.path)):
                    removed += 1
        return removed

    def sync_dir(self) -> None:
        """Make the names of blobs committed with `sync_dir=False` durable."""
        _fsync_dir(self.blobs_dir)

    def disk_usage(self) -> int:
        """Bytes held by complete blobs."""
        total = 0
        with os.scandir(self.blobs_dir) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    try:
                        total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
        return total


class BlobWriter:
    """Streams one blob into a temp file beside its final name, hashing as it goes.

    `commit()` fsyncs the file, renames it to its digest and fsyncs the folder: after it returns,
    the blob survives a crash. Leaving the `with` block without commit removes the temp file.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        name = f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self._tmp = store.blobs_dir / name
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._file = os.fdopen(fd, "wb", buffering=_CHUNK)
        self._hash = xxhash.xxh3_128()
        self._size = 0
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError("write to a committed or aborted BlobWriter")
        self._hash.update(data)
        self._file.write(data)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._size += n
        return n

    # File-object protocol, so a BlobWriter can sit under zstandard or tarfile.
    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def commit(self, *, sync_dir: bool = True) -> BlobRef:
        """Complete the blob. With `sync_dir=False` its name is durable only after the caller's
        `BlobStore.sync_dir()` (a pull commits several blobs, then syncs the folder once before
        any index row names them)."""
        if self._done:
            raise ValueError("BlobWriter already finished")
        self._file.flush()
        digest = format_digest(self._hash.hexdigest())
        final = self._store.blob_path(digest)
        if final.is_file() and final.stat().st_size == self._size:
            # Already stored (a step that changes nothing makes the same empty layer every
            # time): a final name is complete and was fsynced, so this copy is dropped
            # without the two fsyncs a new blob costs.
            self._file.close()
            _unlink_quiet(self._tmp)
            self._done = True
            return BlobRef(digest, self._size, existed=True)
        os.fsync(self._file.fileno())
        self._file.close()
        # Replacing an existing blob is harmless: same name, same bytes; open readers keep theirs.
        os.replace(self._tmp, final)
        if sync_dir:
            _fsync_dir(final.parent)
        self._done = True
        return BlobRef(digest, self._size)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        except OSError:
            pass  # flushing what is being thrown away failed (a full disk): nothing to keep
        finally:
            _unlink_quiet(self._tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _VerifyingReader:
    """A read-only file that hashes everything it hands out and checks the digest at EOF."""

    def __init__(self, f: BinaryIO, store: BlobStore, digest: str, path: Path) -> None:
        self._f = f
        self._store = store
        self._digest = digest
        self._path = path
        self._hash = xxhash.xxh3_128()
        self._st = os.fstat(f.fileno())
        self._checked = False
        self.name = str(path)

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        actual = format_digest(self._hash.hexdigest())
        if actual != self._digest:
            self._store._discard_if_same(self._path, self._st)
            raise CorruptBlob(self._digest, self._path, actual)

    def read(self, size: int = -1) -> bytes:
        if self._checked:
            return b""
        if size is None or size < 0:
            data = self._f.read()
            self._hash.update(data)
            self._check()
            return data
        data = self._f.read(size)
        if data:
            self._hash.update(data)
        elif size > 0:
            self._check()
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        n = len(data)
        memoryview(buf)[:n] = data
        return n

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self) -> _VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tmp_owner(name: str) -> int | None:
    rest = name[len(_TMP_PREFIX) :]
    pid, _, _ = rest.partition("-")
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process runs with this pid (a zombie counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


def _unlink_quiet(path: Path | str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
