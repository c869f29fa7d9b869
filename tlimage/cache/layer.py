"""Deterministic layer tars, and applying them onto a directory.

A layer is a PAX tar compressed with zstd, stored in the blob store under the xxh3-128 of its
compressed bytes. Its `diff_id` is the sha256 of the uncompressed tar, as OCI image configs need.
Layers pulled from a registry keep the registry's bytes (gzip or zstd); readers tell the
compression from the blob's first bytes (`open_tar`), as containerd does.

What makes the tar bytes a function of the tree alone (not of when, how or by whom it was made):
- entries in depth-first order, siblings sorted by the bytes of their names; a directory's opaque
  marker comes right after the directory and before its children;
- every mtime set to one constant (`mtime`, default 0; the builder passes it, e.g. from
  SOURCE_DATE_EPOCH, and puts it in the cache key — this module never reads the environment);
- numeric owners kept, user and group names empty; modes are the permission bits (0o7777) only;
- atime/ctime, device and inode numbers never written; only `security.capability` and `user.*`
  extended attributes kept (overlayfs' own `*.overlay.*` attributes are never copied);
- zstd in multi-threaded mode, whose output does not depend on the number of worker threads.

Overlay upper directories (`layer_from_upper`) are turned into OCI whiteouts: a 0:0 character
device becomes `.wh.<name>`, a directory marked opaque (`trusted.overlay.opaque=y`, or
`user.overlay.opaque=y` under `userxattr`, or listed in `opaque_dirs` where xattrs cannot be
read) gets a `.wh..wh..opq` entry. Uppers made with `redirect_dir` or `metacopy` are refused: they
are not self-contained; the executor mounts with `redirect_dir=off,metacopy=off`.

Not represented: sockets (skipped, as Docker does), and source names that start with `.wh.` (they
would read back as whiteouts; refused with an error).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tlimage._fs import OVERLAY_OPAQUE_XATTRS, ExtractStats, is_overlay_opaque
from tlimage.errors import CacheError

if TYPE_CHECKING:
    from tlimage.cache.store import BlobStore

MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
DEFAULT_LEVEL = 3

_CHUNK = 1 << 20
_KEPT_XATTR_PREFIXES = ("user.", "security.capability")
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_REFUSED_OVERLAY_XATTRS = ("redirect", "metacopy")
_PAX_XATTR = "SCHILY.xattr."


class LayerError(CacheError):
    """A tree cannot be turned into a layer, or a layer cannot be applied safely."""


class BadCompression(LayerError):
    """A stored layer's compressed bytes do not decompress."""


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """A layer blob in the store. `digest` names the compressed blob (`xxh3:<hex>`), `diff_id` is
    the OCI diff_id (`sha256:<hex>` of the uncompressed tar)."""

    digest: str
    diff_id: str
    size: int
    uncompressed_size: int
    entries: int
    media_type: str = MEDIA_TYPE


@dataclass(frozen=True, slots=True)
class TarStats:
    diff_id: str
    uncompressed_size: int
    entries: int


# What apply_layer returns: the extraction's counts (entries, files, bytes, whiteouts) and, as
# (path inside the layer, reason), what was skipped: devices that could not be made, xattrs refused.
ApplyStats = ExtractStats


# ----------------------------------------------------------------------------------------------
# Writing


def layer_from_upper(
    upper_dir: str | os.PathLike[str],
    store: BlobStore,
    *,
    opaque_dirs: Iterable[str] = (),
    mtime: int = 0,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
) -> LayerInfo:
    """Store the layer for an overlay upper directory (what a RUN step changed)."""
    return _store_layer(upper_dir, store, True, opaque_dirs, mtime, level, threads)


def layer_from_dir(
    root: str | os.PathLike[str],
    store: BlobStore,
    *,
    mtime: int = 0,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
) -> LayerInfo:
    """Store a plain tree (a base rootfs, a COPY's files) as a layer; nothing is a whiteout."""
    return _store_layer(root, store, False, (), mtime, level, threads)


def _store_layer(src, store, upper, opaque_dirs, mtime, level, threads) -> LayerInfo:
    with store.writer() as w:
        stats = write_layer(
            src, w, upper=upper, opaque_dirs=opaque_dirs, mtime=mtime, level=level, threads=threads
        )
        ref = w.commit()
    return LayerInfo(ref.digest, stats.diff_id, ref.size, stats.uncompressed_size, stats.entries)


def write_layer(
    src: str | os.PathLike[str],
    out: BinaryIO,
    *,
    upper: bool,
    opaque_dirs: Iterable[str] = (),
    mtime: int = 0,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
) -> TarStats:
    """Write the zstd-compressed layer tar of `src` to `out` (any writable binary file)."""
    import zstandard

    # Always multi-threaded (>= 1 worker): zstd's output is then the same for any worker count.
    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    cctx = zstandard.ZstdCompressor(level=level, threads=workers, write_checksum=True)
    zw = cctx.stream_writer(out, closefd=False)
    stats = write_tar(src, zw, upper=upper, opaque_dirs=opaque_dirs, mtime=mtime)
    zw.flush(zstandard.FLUSH_FRAME)
    zw.close()
    return stats


def write_tar(
    src: str | os.PathLike[str],
    out: BinaryIO,
    *,
    upper: bool,
    opaque_dirs: Iterable[str] = (),
    mtime: int = 0,
) -> TarStats:
    """Write the uncompressed, deterministic tar of `src` to `out`."""
    root = os.fspath(src)
    if not os.path.isdir(root):
        raise LayerError(f"layer source is not a directory: {root}")
    opaque = {_norm_rel(p, "opaque_dirs entry") for p in opaque_dirs}
    for rel in opaque:
        if not os.path.isdir(os.path.join(root, rel) if rel else root):
            raise LayerError(f"opaque_dirs names {rel or '.'!r}, not a directory in {root}")

    tee = _Sha256Tee(out)
    tf = tarfile.TarFile(
        fileobj=tee,  # type: ignore[arg-type]
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        copybufsize=_CHUNK,
    )
    entries = 0
    links: dict[tuple[int, int], str] = {}
    try:
        if upper and ("" in opaque or is_overlay_opaque(root)):
            tf.addfile(_marker(OPAQUE_MARKER, mtime))
            entries += 1
        for rel, path, st in _walk(root):
            entries += _add(tf, rel, path, st, upper, opaque, links, mtime)
    finally:
        tf.close()
    return TarStats("sha256:" + tee.hexdigest(), tee.size, entries)


def _walk(root: str, rel_dir: str = "") -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, lstat), depth-first, siblings sorted by the bytes of their
    names; a directory's children come right after it."""
    abs_dir = os.path.join(root, rel_dir) if rel_dir else root
    try:
        names = sorted(os.listdir(abs_dir), key=os.fsencode)
    except OSError as e:
        raise LayerError(f"cannot list {abs_dir}: {e.strerror}") from e
    for name in names:
        rel = f"{rel_dir}/{name}" if rel_dir else name
        path = os.path.join(abs_dir, name)
        st = os.lstat(path)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, rel)


def _add(tf, rel, path, st, upper, opaque, links, mtime) -> int:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(WHITEOUT_PREFIX):
        raise LayerError(
            f"{path}: names starting with '{WHITEOUT_PREFIX}' cannot be stored in a layer "
            "(they are reserved for OCI whiteouts)"
        )
    mode = st.st_mode
    xattr_names = _listxattr(path) if not stat.S_ISLNK(mode) else _listxattr(path, follow=False)

    if upper:
        for x in xattr_names:
            if x.startswith(_OVERLAY_XATTR_PREFIXES) and x.rsplit(".", 1)[-1] in (
                _REFUSED_OVERLAY_XATTRS
            ):
                raise LayerError(
                    f"{path} carries overlayfs attribute {x}: the upper directory is not "
                    "self-contained; mount the overlay with redirect_dir=off,metacopy=off"
                )
        is_whiteout = (stat.S_ISCHR(mode) and st.st_rdev == 0) or (
            stat.S_ISREG(mode)
            and st.st_size == 0
            and any(x.endswith(".overlay.whiteout") for x in xattr_names)
        )
        if is_whiteout:
            parent = rel.rpartition("/")[0]
            wh = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
            tf.addfile(_marker(wh, mtime))
            return 1

    ti = tarfile.TarInfo(rel)
    ti.mode = stat.S_IMODE(mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = mtime
    pax = _xattr_pax(path, xattr_names, follow=not stat.S_ISLNK(mode))
    if pax:
        ti.pax_headers = pax

    if stat.S_ISDIR(mode):
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        if upper and (
            rel in opaque
            or (any(x in OVERLAY_OPAQUE_XATTRS for x in xattr_names) and is_overlay_opaque(path))
        ):
            tf.addfile(_marker(f"{rel}/{OPAQUE_MARKER}", mtime))
            return 2
        return 1

    if st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = links.get(key)
        if first is not None:
            ti.type = tarfile.LNKTYPE
            ti.linkname = first
            ti.mode = stat.S_IMODE(mode)
            tf.addfile(ti)
            return 1
        links[key] = rel

    if stat.S_ISREG(mode):
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise LayerError(f"cannot read {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            try:
                tf.addfile(ti, f)
            except OSError as e:  # tarfile: "unexpected end of data" when the file shrank
                raise LayerError(f"{path} changed while it was being archived: {e}") from e
    elif stat.S_ISLNK(mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(path)
        tf.addfile(ti)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        tf.addfile(ti)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
        tf.addfile(ti)
    else:  # sockets: not representable in a tar
        return 0
    return 1


def _marker(name: str, mtime: int) -> tarfile.TarInfo:
    """A whiteout entry: empty regular file, mode 0, owner 0:0 (as containerd writes them)."""
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.REGTYPE
    ti.mode = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = mtime
    return ti


def _listxattr(path: str, follow: bool = True) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return []
        raise


def _xattr_pax(path: str, names: list[str], follow: bool) -> dict[str, str]:
    pax: dict[str, str] = {}
    for name in sorted(names):
        if not name.startswith(_KEPT_XATTR_PREFIXES) or name.startswith(_OVERLAY_XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError:
            continue
        # tarfile writes a PAX value as UTF-8, or as raw bytes (hdrcharset=BINARY) when it holds
        # surrogate escapes, so binary values such as capabilities round-trip exactly.
        pax[_PAX_XATTR + name] = value.decode("utf-8", "surrogateescape")
    return pax


class _Sha256Tee:
    """Passes writes through to `sink`, counting and sha256-hashing them (the diff_id)."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._sink.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _norm_rel(path: str, what: str) -> str:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {path!r} leaves the tree ('..' is not allowed)")
    return "/".join(parts)


# ----------------------------------------------------------------------------------------------
# Reading a stored layer: zstd, gzip or a plain tar, told by its first bytes


def sniff_compression(head: bytes) -> str:
    """ "zstd", "gzip" or "none" for a blob starting with `head` (at least 4 bytes, or all)."""
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"


def blob_compression(path: str | os.PathLike[str]) -> str:
    """The compression of the blob file at `path` (see `sniff_compression`)."""
    with open(path, "rb") as f:
        return sniff_compression(f.read(4))


try:  # zlib-ng inflates layer data about twice as fast as zlib, with the GIL released
    from zlib_ng import zlib_ng as _zlib
except ImportError:  # pragma: no cover - a dependency; zlib does the same, slower
    _zlib = zlib  # type: ignore[misc]

GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _zlib.error)


def gzip_decompressor() -> Any:
    """A decompressobj for one gzip member (zlib-ng's, else zlib's); errors: `GZIP_ERRORS`."""
    return _zlib.decompressobj(wbits=31)


class _Prefixed:
    """`raw` with `head` (bytes already read from it) put back in front."""

    def __init__(self, raw: BinaryIO, head: bytes) -> None:
        self._raw = raw
        self._head = head

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(size)

    def readable(self) -> bool:
        return True


class _Inflater(io.RawIOBase):
    """gzip (one member or several, as pigz and some registries write) decompressed as it is
    read."""

    def __init__(self, raw: _Prefixed) -> None:
        self._raw = raw
        self._d = gzip_decompressor()
        self._fed = False  # the current member has been given bytes
        self._tail = b""  # compressed bytes read but not yet given to the decompressor
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(buf)
        while not self._done:
            if self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            elif self._tail:
                data, self._tail = self._tail, b""
            else:
                data = self._raw.read(_CHUNK)
                if not data:
                    if self._fed and not self._d.eof:
                        raise BadCompression("layer is not valid gzip data: it ends in the middle")
                    self._done = True
                    return 0
            if not self._fed and not self._d.eof and not data.strip(b"\0"):
                continue  # zero padding after the last member (gzip(1) tolerates it too)
            self._fed = True
            try:
                out = self._d.decompress(data, want)
            except GZIP_ERRORS as e:
                raise BadCompression(f"layer is not valid gzip data: {e}") from None
            if self._d.eof:
                self._tail = self._d.unused_data
                self._d = gzip_decompressor()
                self._fed = False
            if out:
                n = len(out)
                buf[:n] = out
                return n
        return 0


def open_tar(raw: BinaryIO) -> tuple[BinaryIO, str]:
    """The uncompressed tar stream of the layer blob being read from `raw`, and its compression
    ("zstd", "gzip" or "none"). Decompression errors raise BadCompression (zstd: ZstdError)."""
    head = b""
    while len(head) < 4:
        more = raw.read(4 - len(head))
        if not more:
            break
        head += more
    kind = sniff_compression(head)
    src = _Prefixed(raw, head)
    if kind == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_across_frames=True, closefd=False
        )
        return reader, kind  # type: ignore[return-value]
    if kind == "gzip":
        return io.BufferedReader(_Inflater(src), _CHUNK), kind  # type: ignore[return-value]
    return src, kind  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Pulled layers whose diff_id is checked when they are first read
#
# A pull verifies each blob's sha256 as it streams and stores it as sent; inflating it only to
# hash the tar would double the work (the first unpack inflates it anyway). The image config's
# diff_id is recorded beside the blob (`<layers-v1>/unverified/<hex>`, written before any index
# row names the blob) and checked by the first full read: a match removes the note; a mismatch
# discards the blob (the pull fetches it again) and raises.

_UNVERIFIED = "unverified"


def _note(store: BlobStore, digest: str) -> Path:
    from tlimage.cache.store import parse_digest

    return Path(store.path) / _UNVERIFIED / parse_digest(digest)


def mark_unverified(store: BlobStore, digest: str, diff_id: str, source: str = "") -> None:
    """Note that the blob `digest` must unpack to `diff_id` (checked on its first read);
    `source` (the image reference it came with) is named if it does not."""
    from tlimage.cache.store import atomic_write_bytes

    note = _note(store, digest)
    note.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(note, f"{diff_id}\n{source}".encode())


def _read_note(store: BlobStore, digest: str) -> tuple[str | None, str]:
    try:
        diff_id, _, source = _note(store, digest).read_text().partition("\n")
    except (OSError, ValueError):
        return None, ""
    return diff_id.strip() or None, source.strip()


def unverified_diff_id(store: BlobStore, digest: str) -> str | None:
    """The diff_id the blob must still be checked against, or None (checked, or built here)."""
    return _read_note(store, digest)[0]


def settle_diff_id(store: BlobStore, digest: str, actual: str) -> None:
    """The first full read of `digest` hashed its tar to `actual`: clear the note, or discard
    the blob and raise LayerError when it differs from what the image config said."""
    expected, source = _read_note(store, digest)
    if expected is None:
        return
    note = _note(store, digest)
    if actual != expected:
        store.delete(digest)
        note.unlink(missing_ok=True)
        of = f" of {source}" if source else ""
        raise LayerError(f"layer {digest}{of} unpacks to {actual}, but its image config says "
                         f"{expected}; the layer was discarded", hint="pull the image again; "
                         "if this repeats, the image in the registry is broken")  # fmt: skip
    note.unlink(missing_ok=True)


class HashingReader:
    """A read-only stream that hashes (sha256) everything read through it."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self.hash.update(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> str:
        """Read to the end; the `sha256:` digest of everything read."""
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.hash.hexdigest()


def tar_digest(store: BlobStore, digest: str, *, discard: bool = True) -> str:
    """The `sha256:` of a stored layer's uncompressed tar (one full read, the blob verified
    against its name on the way). A blob that does not decompress raises LayerError (and is
    deleted when `discard`)."""
    import zstandard

    with store.open(digest, verify=True) as raw:
        try:
            stream, _ = open_tar(raw)
            actual = HashingReader(stream).drain()
        except (zstandard.ZstdError, BadCompression) as e:
            _drain(raw)
            if discard:
                store.delete(digest)
            raise LayerError(f"layer {digest} does not decompress: {e}") from None
        while raw.read(_CHUNK):  # the verifying reader checks the blob at its end
            pass
    return actual


def ensure_verified(store: BlobStore, digest: str) -> None:
    """Check a pulled blob's pending diff_id now with one read of it (paths that extract a layer
    other than through `unpacked_layer`, which checks while it unpacks)."""
    if unverified_diff_id(store, digest) is None:
        return
    settle_diff_id(store, digest, tar_digest(store, digest))


def claim_diff_id(store: BlobStore, digest: str, diff_id: str, *, new_blob: bool,
                  source: str = "") -> str | None:  # fmt: skip
    """A pull stored (or found stored) the blob `digest` for an image config that says it
    unpacks to `diff_id`. Returns None when the claim is accepted, else the blob's real diff_id
    (the image is wrong; the caller refuses it).

    One image's config never discards or un-verifies a blob another image or a build put there:
    - a blob this pull wrote anew is noted as unverified (`mark_unverified`; its first unpack
      checks it);
    - a blob that was already stored and has no note is verified (or was made here): the claim
      is checked now with one read, and a wrong one changes nothing;
    - a blob still noted for another claim: the same claim is accepted as is; a different one
      is settled now with one read — the note goes when either claim proves right, the blob is
      never deleted here (a wrong earlier claim is the earlier image's to find)."""
    if new_blob:
        mark_unverified(store, digest, diff_id, source)
        return None
    pending = unverified_diff_id(store, digest)
    if pending == diff_id:
        return None
    actual = tar_digest(store, digest, discard=False)
    if actual in (diff_id, pending):
        _note(store, digest).unlink(missing_ok=True)  # checked now: verified
    return None if actual == diff_id else actual


# ----------------------------------------------------------------------------------------------
# Applying


def apply_layer(
    layer: str | os.PathLike[str] | BinaryIO,
    dest_dir: str | os.PathLike[str],
    *,
    compressed: bool = True,
    same_owner: bool | None = None,
) -> ApplyStats:
    """Extract a layer onto `dest_dir`, applying OCI whiteouts against what is already there.

    `layer` is a path or a readable binary file (e.g. `store.open(digest, verify=True)`; a
    corrupt blob then raises `CorruptBlob` at the end, and `dest_dir` must be thrown away).

    Safety (`tlimage._fs.Extractor`): entry names with `..` are refused; symlinks met on the way
    to an entry resolve as if `dest_dir` were the root (an absolute or `..`-laden target never
    leaves it), the entry's own final component is never followed, and a hard link may only name
    an entry this same layer created. Entries that are whited out only remove what lower layers
    put there, never what this same layer wrote. Owners are applied when running as root (or
    `same_owner=True`); devices that cannot be created are listed in `ApplyStats.skipped`.
    """
    import zstandard

    from tlimage._fs import Extractor

    dest = os.path.abspath(os.fspath(dest_dir))
    os.makedirs(dest, exist_ok=True)

    if isinstance(layer, (str, os.PathLike)):
        raw: BinaryIO = open(layer, "rb")
        close_raw = True
    else:
        raw, close_raw = layer, False
    try:
        stream = open_tar(raw)[0] if compressed else raw
        with (
            Extractor(dest, whiteouts="apply", same_owner=same_owner, error=LayerError) as ex,
            tarfile.open(  # fmt: skip
                fileobj=stream,
                mode="r|",
                bufsize=_CHUNK,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tf,
        ):
            for member in tf:
                ex.add(tf, member)
            # Drain to EOF so a verifying reader gets to check the blob's digest.
            while stream.read(_CHUNK):
                pass
            if compressed:
                while raw.read(_CHUNK):
                    pass
            ex.finish()
            st = ex.stats
        return st
    except tarfile.TarError as e:
        _drain(raw)  # a verifying reader reports a corrupt blob as such, not as a bad tar
        raise LayerError(f"layer is not a valid tar: {e}") from e
    except zstandard.ZstdError as e:
        _drain(raw)
        raise LayerError(f"layer is not valid zstd data: {e}") from e
    except BadCompression:
        _drain(raw)
        raise
    finally:
        if close_raw:
            raw.close()


def _drain(raw: BinaryIO) -> None:
    try:
        while raw.read(_CHUNK):
            pass
    except (OSError, ValueError):
        pass
