"""Host-side file work below a root folder that never reaches outside it.

Everything tlimage writes on the host from untrusted input — ADD archives (local or fetched),
COPY from the context or another stage, layers (built here or pulled), a microVM's exported upper,
`tl sbx cp` — goes through this module:

- a path below a root is resolved one component at a time, through directory file descriptors
  opened with O_NOFOLLOW; a symlink met on the way is read and resolved as if the root were `/`
  (an absolute or `..`-laden target never leaves it); a path's own last component is never
  followed when it is written;
- files are created with O_CREAT|O_EXCL|O_NOFOLLOW (whatever was there is unlinked first, so no
  existing file is ever opened for writing); owners, modes, times and xattrs are applied to what
  was just created, through its descriptor or relative to its parent's descriptor;
- a hard link may only point at an entry the same extraction created, checked by inode, so an
  archive cannot link (and then chown or chmod) a host file;
- symlinks are created as links and never followed on the host.

`resolve_in_root` and `glob_in_root` read a tree the same way (COPY --from, the context, mount
sources); `write_atomic` writes a small file by rename; `flock_wait` takes a lock with a
deadline.

Device nodes (the one rule for pulled and imported layers, ADD archives and stored layers,
`refused_entry` and `Extractor`): a character or block device is accepted wherever an archive
puts it, as Docker, containerd and BuildKit accept it (root filesystems made by debootstrap or
mmdebstrap carry /dev/console, /dev/null…; others carry nodes elsewhere). Where it points does
not matter inside a sandbox: every sandbox mount is `nodev`, so a node opens nothing there. On
the host, where layers are unpacked, a node is created owned by root with mode 0600 whatever
the archive says (or skipped and listed when mknod is not permitted), so no other host user can
open it either. A path with `..` (or a hard link to one) is refused before anything is written.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from tlimage.errors import TlimageError

MAX_SYMLINKS = 40
DEVICE_MODE = 0o600  # device nodes unpacked on the host: root's only (see the module docstring)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_OPAQUE_XATTRS = (OVERLAY_OPAQUE_XATTR, "user.overlay.opaque")  # root's, rootless
PAX_XATTR = "SCHILY.xattr."
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(TlimageError):
    """An archive or tree would write outside its destination, or through something that is not
    a folder."""


def split(path: str) -> list[str]:
    """The components of a slash-separated path, without empty and `.` parts."""
    return [p for p in path.split("/") if p not in ("", ".")]


# ----------------------------------------------------------------------------------------------
# Reading: resolving paths inside a root


def resolve_in_root(root: str | os.PathLike[str], path: str, *, follow_last: bool = True) -> str:
    """`path` resolved inside `root` as if `root` were `/`: symlinks on the way (and the last
    component, with `follow_last`) are followed, none leaving the root. Returns the real relative
    path ("" for the root itself). Raises FileNotFoundError when a component is missing or not a
    folder, and OSError(ELOOP) after too many links."""
    rootp = os.fspath(root)
    todo = split(path)
    done: list[str] = []
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp == "..":
            if done:
                done.pop()
            continue
        cur = os.path.join(rootp, *done, comp)
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "not found", path) from None
        if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(cur)
            if target.startswith("/"):
                done = []
            todo = split(target) + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(errno.ENOTDIR, "not a folder", path)
        done.append(comp)
    return "/".join(done)


Matcher = Callable[[str], bool]


def glob_in_root(root: str | os.PathLike[str], parts: list[str | Matcher]) -> list[tuple[str, str]]:
    """Wildcard matching inside `root` with links resolved as if `root` were `/`. `parts` are the
    pattern's components: a literal name, or a predicate on a name. Returns sorted
    (matched path as written, real relative path) pairs; dangling matches are left out."""
    rootp = os.fspath(root)
    level: list[tuple[str, str]] = [("", "")]
    for part in parts:
        nxt: list[tuple[str, str]] = []
        for shown, real in level:
            base = os.path.join(rootp, real) if real else rootp
            if isinstance(part, str):
                names = [part] if os.path.lexists(os.path.join(base, part)) else []
            else:
                try:
                    names = [n for n in os.listdir(base) if part(n)]
                except (NotADirectoryError, FileNotFoundError):
                    continue
            for name in sorted(names, key=os.fsencode):
                s = f"{shown}/{name}" if shown else name
                try:
                    r = resolve_in_root(rootp, f"{real}/{name}" if real else name)
                except OSError:
                    continue
                nxt.append((s, r))
        level = nxt
    return level


def open_file_in_root(root: str | os.PathLike[str], real: str) -> int:
    """A read-only descriptor for the regular file at the real relative path `real` (from
    `resolve_in_root`), opened without following links on the way. Anything but a regular file
    (a fifo, a device an image planted) is refused before it is opened for reading."""
    with Root(root) as r:
        pfd = r.open_dir(posix_dirname(real), create=False, follow=False)
        try:
            fd = os.open(posix_basename(real), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)  # fmt: skip
        finally:
            os.close(pfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{real} is not a regular file")
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def setxattr_in_root(root: str | os.PathLike[str], rel: str, name: str, value: bytes) -> None:
    """Set an xattr on the entry `rel` below `root` (not following links anywhere on the way;
    `..` refused)."""
    parts = split(rel)
    if ".." in parts:
        raise UnsafePathError(f"{rel!r} leaves the folder ('..' is not allowed)")
    with Root(root) as r:
        pfd = r.open_dir(parts[:-1], create=False, follow=False)
        try:
            os.setxattr(_proc(pfd, parts[-1] if parts else "."), name, value,
                        follow_symlinks=False)  # fmt: skip
        finally:
            os.close(pfd)


def posix_dirname(p: str) -> str:
    return p.rpartition("/")[0]


def posix_basename(p: str) -> str:
    return p.rpartition("/")[2]


# ----------------------------------------------------------------------------------------------
# Writing below a root


class Root:
    """A folder opened once; every later operation is relative to its descriptor."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if create:
            os.makedirs(self.path, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_dir(
        self,
        path: str | list[str],
        *,
        create: bool = True,
        follow: bool = True,
        on_mkdir: Callable[[int, str, list[str]], None] | None = None,
    ) -> int:
        """An O_PATH descriptor of the folder `path`, resolved inside the root (symlinks
        followed as if the root were `/` when `follow`, else refused). Missing folders are made
        (0755, or as `on_mkdir(parent_fd, name, real_parts)` says) when `create`. The caller
        closes it. Raises UnsafePathError when a component exists and is not a folder."""
        fd, _ = self.walk(path, create=create, follow=follow, on_mkdir=on_mkdir)
        return fd

    def walk(self, path: str | list[str], *, create: bool = True, follow: bool = True,
             on_mkdir: Callable[[int, str, list[str]], None] | None = None,
             ) -> tuple[int, list[str]]:  # fmt: skip
        todo = split(path) if isinstance(path, str) else list(path)
        stack: list[tuple[str, int]] = []
        hops = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if stack:
                        os.close(stack.pop()[1])
                    continue
                cur = stack[-1][1] if stack else self.fd
                try:
                    st = os.lstat(comp, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=cur)
                    if on_mkdir is not None:
                        on_mkdir(cur, comp, [n for n, _ in stack] + [comp])
                    else:
                        _chmod_at(cur, comp, 0o755)
                    st = os.lstat(comp, dir_fd=cur)
                if stat.S_ISLNK(st.st_mode):
                    if not follow:
                        raise UnsafePathError(f"{'/'.join([n for n, _ in stack] + [comp])} is a "
                                              "symbolic link")  # fmt: skip
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise UnsafePathError(f"too many symbolic links resolving {path!r}")
                    target = os.readlink(comp, dir_fd=cur)
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[1])
                    todo = split(target) + todo
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    where = "/".join([n for n, _ in stack] + [comp])
                    raise UnsafePathError(f"{where} exists and is not a folder")
                stack.append((comp, os.open(comp, _DIR_FLAGS, dir_fd=cur)))
            real = [n for n, _ in stack]
            top = stack.pop()[1] if stack else os.open(".", _DIR_FLAGS, dir_fd=self.fd)
            return top, real
        finally:
            for _, fd in stack:
                os.close(fd)


def _chmod_at(dir_fd: int, name: str, mode: int) -> None:
    """chmod `name` in `dir_fd` without following it (a symlink is left alone)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> bool:
    """Remove whatever `name` is in `dir_fd` (a folder with its contents). False if absent."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def _proc(dir_fd: int, name: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{name}"


# ----------------------------------------------------------------------------------------------
# Extracting tar streams


@dataclass(slots=True)
class ExtractStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def refused_entry(name: str, kind: str, linkname: str = "") -> str | None:
    """Why an archive entry is refused by its name and type alone, before anything is written
    (streamed layer checks use this; the Extractor enforces the same while it writes), or None.
    `kind` is the tar type flag ("0" file, "1" hard link, "2" symlink, "3"/"4" devices...).
    Device nodes are accepted anywhere (see the module docstring)."""
    if ".." in name.replace("\\", "/").split("/"):
        return f"entry {name!r} leaves the tree ('..' is not allowed)"
    if kind == "1" and ".." in linkname.split("/"):
        return f"hard link {name!r} -> {linkname!r} leaves the tree"
    return None


class Extractor:
    """Extracts tar members below `root` (at the folder `under` inside it).

    `whiteouts`: None (names starting `.wh.` are ordinary files), "apply" (OCI whiteouts remove
    what earlier layers put in `root`), or "overlay" (they become overlayfs whiteouts: a 0:0
    character device, or the opaque xattr on the folder).
    `owner`: None keeps the archive's numeric owners (when running as root), or a fixed (uid, gid).
    `devices`: create device nodes and fifos (skipped, and listed, when that is not permitted);
    False skips them silently. `setid`: keep set-uid/set-gid bits.
    `root_entry`: the archive's own root entry (".") sets the root's owner, mode and time.
    `follow_links`: a symlink on the way to an entry is resolved inside the root (as Docker
    does); False refuses the entry instead (`tl sbx cp`, a microVM's export).
    Errors are raised as `error` (a TlimageError subclass)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        under: str = "",
        whiteouts: str | None = None,
        owner: tuple[int, int] | None = None,
        same_owner: bool | None = None,
        devices: bool = True,
        setid: bool = True,
        root_entry: bool = False,
        follow_links: bool = True,
        error: type[TlimageError] = UnsafePathError,
    ) -> None:
        self.root = Root(root, create=True)
        self.under = split(under)
        self.whiteouts = whiteouts
        self.owner = owner
        self.same_owner = (os.geteuid() == 0) if same_owner is None else same_owner
        self.devices = devices
        self.setid = setid
        self.root_entry = root_entry
        self.follow_links = follow_links
        self.error = error
        self.stats = ExtractStats()
        # real relative path -> (dev, ino) of what this extraction created
        self.written: dict[str, tuple[int, int]] = {}
        self.dirs: list[tuple[str, int, int]] = []  # (real path, mode, mtime ns) applied last
        self._base_real: list[str] | None = None

    def close(self) -> None:
        self.root.close()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names --------------------------------------------------------------------------------

    def _parts(self, name: str) -> list[str]:
        parts = split(name)
        if ".." in parts:
            raise self.error(f"archive entry {name!r} leaves the destination ('..' is not "
                             "allowed)")  # fmt: skip
        return parts

    def _parent(self, parts: list[str], name: str) -> tuple[int, list[str]]:
        try:
            return self.root.walk([*self.under, *parts[:-1]], create=True,
                                  follow=self.follow_links)  # fmt: skip
        except UnsafePathError as e:
            if not self.follow_links and "symbolic link" in e.message:
                raise self.error(f"archive entry {name!r} leads outside the destination through "
                                 f"a symbolic link ({e.message})") from None  # fmt: skip
            raise self.error(f"archive entry {name!r}: {e.message}") from None

    # -- members ------------------------------------------------------------------------------

    def extract(self, tf: tarfile.TarFile) -> ExtractStats:
        for m in tf:
            self.add(tf, m)
        self.finish()
        return self.stats

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self._parts(m.name)
        self.stats.entries += 1
        try:
            if not parts:
                if self.root_entry and m.isdir():
                    self._root(m)
                return
            pfd, preal = self._parent(parts, m.name)
            try:
                self._add_at(tf, m, pfd, preal, parts[-1])
            finally:
                os.close(pfd)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
            raise self.error(f"archive entry {m.name!r}: {e.strerror or e}") from None

    def _root(self, m: tarfile.TarInfo) -> None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root.fd)
        try:
            self._fown(fd, m)
        finally:
            os.close(fd)
        self.dirs.append(("", self._mode(m), _ns(m.mtime)))

    def _add_at(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, preal: list[str],
                base: str) -> None:  # fmt: skip
        real = "/".join([*preal, base])
        if self.whiteouts and base.startswith(WHITEOUT_PREFIX):
            self._whiteout(pfd, preal, base)
            return
        try:
            st: os.stat_result | None = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            st = None
        if m.isdir():
            if st is not None and not stat.S_ISDIR(st.st_mode):
                _remove_at(pfd, base)
                st = None
            if st is None:
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)  # fmt: skip
            try:
                self._fown(fd, m)
                self._record(real, os.fstat(fd))
                self._xattrs_fd(fd, m)
            finally:
                os.close(fd)
            self.dirs.append((real, self._mode(m), _ns(m.mtime)))
            return
        if st is not None:
            _remove_at(pfd, base)
            self.written.pop(real, None)
        if m.isreg():
            self._file(tf, m, pfd, base, real)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=pfd)
            self._lown(pfd, base, m)
            os.utime(base, ns=(_ns(m.mtime),) * 2, dir_fd=pfd, follow_symlinks=False)
            self._record(real, os.lstat(base, dir_fd=pfd))
        elif m.islnk():
            self._hardlink(m, pfd, base, real)
        elif m.ischr() or m.isblk() or m.isfifo():
            self._device(m, pfd, base, real)
        else:
            self.stats.skipped.append((m.name, f"unsupported tar entry type {m.type!r}"))

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, base: str,
              real: str) -> None:  # fmt: skip
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)  # fmt: skip
        try:
            src = tf.extractfile(m)
            if src is not None:
                _copy_to_fd(src, fd)
            self._fown(fd, m)
            os.fchmod(fd, self._mode(m))
            self._xattrs_fd(fd, m)
            os.utime(fd, ns=(_ns(m.mtime),) * 2)
            self._record(real, os.fstat(fd))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, base: str, real: str) -> None:
        tparts = self._parts(m.linkname)
        if not tparts:
            raise self.error(f"hard link {m.name!r} has an empty target")
        try:
            tfd, treal = self.root.walk([*self.under, *tparts[:-1]], create=False,
                                        follow=self.follow_links)  # fmt: skip
        except (OSError, UnsafePathError):
            tfd, treal = -1, []
        try:
            tst = os.lstat(tparts[-1], dir_fd=tfd) if tfd >= 0 else None
        except FileNotFoundError:
            tst = None
        try:
            key = "/".join([*treal, tparts[-1]])
            if tst is None or self.written.get(key) != (tst.st_dev, tst.st_ino):
                raise self.error(f"hard link {m.name!r} points at {m.linkname!r}, which this "
                                 "archive has not created (a link may only name an earlier "
                                 "entry of the same archive)")  # fmt: skip
            if stat.S_ISDIR(tst.st_mode):
                raise self.error(f"hard link {m.name!r} points at a folder ({m.linkname!r})")
            if stat.S_ISCHR(tst.st_mode) and tst.st_rdev == 0:
                os.mknod(base, stat.S_IFCHR, 0, dir_fd=pfd)  # a whiteout: never share its inode
                self._record(real, os.lstat(base, dir_fd=pfd))
                return
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            self._record(real, tst)
        finally:
            if tfd >= 0:
                os.close(tfd)

    def _device(self, m: tarfile.TarInfo, pfd: int, base: str, real: str) -> None:
        if not self.devices:
            return
        try:
            if m.isfifo():
                os.mkfifo(base, 0o600, dir_fd=pfd)
            else:
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                # a 0:0 character device is an overlay whiteout: mode 0, as overlayfs makes it
                whiteout = m.ischr() and m.devmajor == 0 and m.devminor == 0
                os.mknod(base, kind | (0 if whiteout else DEVICE_MODE),
                         os.makedev(m.devmajor, m.devminor), dir_fd=pfd)  # fmt: skip
        except PermissionError as e:
            self.stats.skipped.append((m.name, f"cannot create device: {e.strerror}"))
            return
        if m.isfifo():
            self._lown(pfd, base, m)
            _chmod_at(pfd, base, self._mode(m))
        elif self.same_owner or self.owner is not None:
            # A device node: root's, mode 0600, whatever the archive says (module docstring).
            os.chown(base, 0, 0, dir_fd=pfd, follow_symlinks=False)
        self._xattrs_at(pfd, base, m)
        os.utime(base, ns=(_ns(m.mtime),) * 2, dir_fd=pfd, follow_symlinks=False)
        self._record(real, os.lstat(base, dir_fd=pfd))

    def _whiteout(self, pfd: int, preal: list[str], base: str) -> None:
        self.stats.whiteouts += 1
        prefix = "/".join(preal)
        if base == OPAQUE_MARKER:
            if self.whiteouts == "overlay":
                os.setxattr(_proc(pfd, "."), OVERLAY_OPAQUE_XATTR, b"y")
                return
            for child in os.listdir(_proc(pfd, ".")):
                if f"{prefix}/{child}".lstrip("/") not in self.written:
                    _remove_at(pfd, child)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other `.wh..wh.*` names are aufs bookkeeping
        name = base[len(WHITEOUT_PREFIX) :]
        if not name or "/" in name:
            return
        real = f"{prefix}/{name}".lstrip("/")
        if self.whiteouts == "overlay":
            _remove_at(pfd, name)
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=pfd)
            self._record(real, os.lstat(name, dir_fd=pfd))
        elif real not in self.written:
            _remove_at(pfd, name)

    # -- attributes ---------------------------------------------------------------------------

    def _record(self, real: str, st: os.stat_result) -> None:
        self.written[real] = (st.st_dev, st.st_ino)

    def _mode(self, m: tarfile.TarInfo) -> int:
        return m.mode & (0o7777 if self.setid else 0o1777)

    def _ids(self, m: tarfile.TarInfo) -> tuple[int, int] | None:
        if self.owner is not None:
            return self.owner
        return (m.uid, m.gid) if self.same_owner else None

    def _fown(self, fd: int, m: tarfile.TarInfo) -> None:
        ids = self._ids(m)
        if ids is not None:
            os.fchown(fd, *ids)

    def _lown(self, pfd: int, base: str, m: tarfile.TarInfo) -> None:
        ids = self._ids(m)
        if ids is not None:
            os.chown(base, *ids, dir_fd=pfd, follow_symlinks=False)

    def _xattrs_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        for name, value in _pax_xattrs(m):
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                self.stats.skipped.append((m.name, f"xattr {name}: {e.strerror}"))

    def _xattrs_at(self, pfd: int, base: str, m: tarfile.TarInfo) -> None:
        for name, value in _pax_xattrs(m):
            try:
                os.setxattr(_proc(pfd, base), name, value, follow_symlinks=False)
            except OSError as e:
                self.stats.skipped.append((m.name, f"xattr {name}: {e.strerror}"))

    def finish(self) -> None:
        """Folder modes and times, deepest first (so writing into a folder does not undo its
        time, and read-only folders are made so after their children exist)."""
        for real, mode, mtime in sorted(self.dirs, key=lambda d: d[0].count("/"), reverse=True):
            try:
                pfd = self.root.open_dir(posix_dirname(real), create=False, follow=False)
            except (OSError, UnsafePathError):
                continue  # removed or replaced by a later entry
            try:
                name = posix_basename(real) or "."
                try:
                    st = os.lstat(name, dir_fd=pfd)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    continue
                _chmod_at(pfd, name, mode)
                os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
        self.dirs.clear()


def _pax_xattrs(m: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in sorted(m.pax_headers.items()):
        if key.startswith(PAX_XATTR):
            yield key[len(PAX_XATTR) :], value.encode("utf-8", "surrogateescape")


def _ns(mtime: float) -> int:
    try:
        return int(mtime * 1_000_000_000)
    except (OverflowError, ValueError):
        return 0


def _copy_to_fd(src: BinaryIO, fd: int) -> None:
    while chunk := src.read(_CHUNK):
        _write_all(fd, chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def extract_tar(
    stream: BinaryIO,
    root: str | os.PathLike[str],
    *,
    mode: str = "r|*",
    **kw: object,
) -> ExtractStats:
    """Extract a tar stream (compressed or not with `r|*`) below `root` with an `Extractor`
    (keyword arguments as for it). A malformed archive raises the Extractor's `error`."""
    error = kw.get("error", UnsafePathError)
    assert isinstance(error, type)
    with Extractor(root, **kw) as ex:  # type: ignore[arg-type]
        try:
            with tarfile.open(fileobj=stream, mode=mode, bufsize=_CHUNK, encoding="utf-8",
                              errors="surrogateescape") as tf:  # fmt: skip
                return ex.extract(tf)
        except (tarfile.TarError, EOFError) as e:
            raise error(f"not a valid archive: {e}") from None
        except (ValueError, UnicodeError) as e:  # e.g. a zlib/lzma error, bad header numbers
            raise error(f"not a valid archive: {e}") from None


# ----------------------------------------------------------------------------------------------
# Copying trees


class TreeWriter:
    """Writes files, links and folders below a root (the destination of a COPY). Paths are
    resolved inside the root; the last component is replaced, never followed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Root(root, create=True)

    def close(self) -> None:
        self.root.close()

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mkdirs(self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        """`mkdir -p path` (new folders `mode`, owned uid:gid)."""

        def made(pfd: int, name: str, _real: list[str]) -> None:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            _chmod_at(pfd, name, mode)

        os.close(self.root.open_dir(path, create=True, on_mkdir=made))

    def is_dir(self, path: str) -> bool:
        try:
            os.close(self.root.open_dir(path, create=False))
            return True
        except (OSError, UnsafePathError):
            return False

    def _parent(self, path: str) -> tuple[int, str]:
        parts = split(path)
        if not parts or ".." in parts:
            raise UnsafePathError(f"cannot write {path!r}")
        return self.root.open_dir(parts[:-1], create=True), parts[-1]

    def dir(self, path: str, *, mode: int, uid: int, gid: int) -> None:
        if not split(path):
            return  # the root: its attributes belong to the image below
        pfd, base = self._parent(path)
        try:
            try:
                st = os.lstat(base, dir_fd=pfd)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                # Into a folder the image links to: resolve inside the root (BuildKit does).
                os.close(self.root.open_dir(path, create=True))
                return
            if st is not None and not stat.S_ISDIR(st.st_mode):
                _remove_at(pfd, base)
                st = None
            if st is None:
                os.mkdir(base, 0o700, dir_fd=pfd)
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            _chmod_at(pfd, base, mode)
        finally:
            os.close(pfd)

    def file_from(self, path: str, src_fd: int, *, mode: int, uid: int, gid: int) -> None:
        def fill(fd: int) -> None:
            with os.fdopen(os.dup(src_fd), "rb") as src:
                _copy_to_fd(src, fd)  # type: ignore[arg-type]

        self._new_file(path, fill, mode=mode, uid=uid, gid=gid)

    def file_bytes(self, path: str, data: bytes, *, mode: int, uid: int, gid: int) -> None:
        self._new_file(path, lambda fd: _write_all(fd, data), mode=mode, uid=uid, gid=gid)

    def _new_file(self, path: str, fill: Callable[[int], None], *, mode: int, uid: int,
                  gid: int) -> None:  # fmt: skip
        """Create `path` afresh (whatever was there is removed first; never opened), filled by
        `fill(fd)`, then owned and moded through its descriptor."""
        pfd, base = self._parent(path)
        try:
            _remove_at(pfd, base)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)  # fmt: skip
            try:
                fill(fd)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(pfd)

    def symlink(self, path: str, target: str, *, uid: int, gid: int) -> None:
        pfd, base = self._parent(path)
        try:
            _remove_at(pfd, base)
            os.symlink(target, base, dir_fd=pfd)
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)


def copy_tree(
    src_root: str | os.PathLike[str],
    src_real: str,
    writer: TreeWriter,
    dest: str,
    *,
    skip: Callable[[str], bool] = lambda _rel: False,
    rel_base: str = "",
    uid: int = 0,
    gid: int = 0,
    file_mode: Callable[[int], int],
    dir_mode: int = 0o755,
) -> None:
    """Copy the folder `src_real` (a real path relative to `src_root`) to `dest` in `writer`.
    Symlinks (to folders too) are copied as links; devices, fifos and sockets refused.
    `skip(rel)` (rel = `rel_base`/path below the folder) leaves a path (and a folder's subtree)
    out."""
    srcp = os.path.join(os.fspath(src_root), src_real) if src_real else os.fspath(src_root)
    writer.dir(dest, mode=dir_mode, uid=uid, gid=gid)

    def walk(rel: str) -> None:
        path = os.path.join(srcp, rel) if rel else srcp
        with os.scandir(path) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            c_rel = f"{rel}/{child.name}" if rel else child.name
            shown = f"{rel_base}/{c_rel}" if rel_base and rel_base != "." else c_rel
            if skip(shown):
                continue
            out = f"{dest}/{c_rel}"
            if child.is_dir(follow_symlinks=False):
                writer.dir(out, mode=dir_mode, uid=uid, gid=gid)
                walk(c_rel)
            else:
                copy_entry(child.path, writer, out, uid=uid, gid=gid, file_mode=file_mode)

    walk("")


def copy_entry(src: str, writer: TreeWriter, dest: str, *, uid: int, gid: int,
               file_mode: Callable[[int], int]) -> None:  # fmt: skip
    """Copy one non-folder entry (a file, or a symlink as a link) without following it."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        writer.symlink(dest, os.readlink(src), uid=uid, gid=gid)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            writer.file_from(dest, fd, mode=file_mode(st.st_mode), uid=uid, gid=gid)
        finally:
            os.close(fd)
    else:
        raise UnsafePathError(f"{src}: only files, folders and symlinks can be copied")


# ----------------------------------------------------------------------------------------------
# Overlay-format layers laid out as one tree


def lay_out_layers(layers: Sequence[str | os.PathLike[str]], dest: str | os.PathLike[str], *,
                   place: str = "link", root_meta: bool = False, dir_times: bool = True,
                   dir_xattrs: bool = True) -> None:  # fmt: skip
    """Lay the overlay-format `layers` (bottom first) out onto the folder `dest` as one plain
    tree, as overlayfs shows the stack: a whiteout (a 0:0 character device, or a file with an
    `overlay.whiteout` xattr) deletes, an opaque folder hides what is below, a file replaces a
    folder and the other way round. Parents are made real folders before their children, so
    nothing is written through a symlink found in `dest`; names are visited sorted.

    `place` says how a non-folder entry gets there: "link" hard-links every entry (nothing is
    copied; OSError when links cannot be made, for the caller to fall back); "copy" hard-links
    regular files or else copies them, and makes symlinks and devices afresh; "move" renames
    regular files out of the layer (which is used up) or else copies them, likewise. Folders get
    their layer's owner and mode, and (`dir_xattrs`) its xattrs but overlayfs' own
    (`*.overlay.*`), and (`dir_times`) its times once their entries are in place. `dest`
    itself gets the owner, mode and xattrs of the layers' roots only with `root_meta` (and only
    then does an opaque root hide what is below)."""
    if place not in ("link", "copy", "move"):
        raise ValueError(f"place must be link, copy or move, not {place!r}")
    for layer in layers:
        _lay_dir(os.fspath(layer), os.fspath(dest), place, top=True, root_meta=root_meta,
                 times=dir_times, xattrs=dir_xattrs)  # fmt: skip


def _lay_dir(src: str, dst: str, place: str, *, top: bool, root_meta: bool, times: bool,
             xattrs: bool) -> None:  # fmt: skip
    st = os.lstat(src)
    opaque = is_overlay_opaque(src)
    if not top:
        try:
            cur: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            cur = None
        if cur is not None and (opaque or not stat.S_ISDIR(cur.st_mode)):
            remove_entry(dst)
            cur = None
        if cur is None:
            os.mkdir(dst)
    elif root_meta and opaque:
        for name in os.listdir(dst):
            remove_entry(os.path.join(dst, name))
    if not top or root_meta:
        os.lchown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        if xattrs:
            for name in sorted(os.listxattr(src, follow_symlinks=False)):
                if ".overlay." not in name:
                    os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                                follow_symlinks=False)  # fmt: skip
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        est = os.lstat(s)
        if stat.S_ISDIR(est.st_mode):
            _lay_dir(s, d, place, top=False, root_meta=root_meta, times=times, xattrs=xattrs)
            continue
        if os.path.lexists(d):
            remove_entry(d)
        if _overlay_whiteout(s, est):
            continue
        _place_entry(s, d, est, place)
    if times:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _place_entry(src: str, dst: str, st: os.stat_result, place: str) -> None:
    if place == "link":
        os.link(src, dst, follow_symlinks=False)
    elif stat.S_ISREG(st.st_mode):
        try:
            (os.replace if place == "move" else os.link)(src, dst)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)
            os.chown(dst, st.st_uid, st.st_gid)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.lchown(dst, st.st_uid, st.st_gid)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
        os.chown(dst, st.st_uid, st.st_gid)


def is_overlay_opaque(path: str) -> bool:
    """Whether the folder `path` is marked opaque the overlayfs way (trusted or user xattr)."""
    for name in OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _overlay_whiteout(path: str, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    try:
        return any(n.endswith(".overlay.whiteout")
                   for n in os.listxattr(path, follow_symlinks=False))  # fmt: skip
    except OSError:
        return False


def remove_entry(path: str) -> None:
    """Remove `path` whatever it is (a folder with all below it); never follows a link."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------------------------
# Small files


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644, *,
                 durable: bool = True) -> None:  # fmt: skip
    """Write `path` by writing a temp file beside it (fsynced unless not `durable`) and renaming
    it into place; an interrupted or failed write (a full disk) leaves the old content and no
    temp file. `str` data is written as UTF-8; the file gets exactly `mode`."""
    p = os.fspath(path)
    folder, name = os.path.split(p)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{name}")
    if isinstance(data, str):
        data = data.encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)  # fmt: skip
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------------------------
# Locks


def flock_wait(target: int | str | os.PathLike[str], timeout: float | None,
               on_wait: Callable[[], None] | None = None, *,
               shared: bool = False) -> int:  # fmt: skip
    """Take an flock (exclusive, or `shared`) on `target` — an open descriptor, or a path opened
    (created 0644) here — waiting at most `timeout` seconds (None: as long as it takes; 0: one
    try). flock itself has no timeout, so this polls with a growing pause (10 ms to 200 ms).
    `on_wait` is called once, the first time the lock is found held. Returns the descriptor
    (the caller closes it, which releases the lock); on timeout raises TimeoutError, having
    closed a descriptor it opened."""
    import fcntl
    import time

    own = not isinstance(target, int)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644) if own else target
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, op)
                return fd
            except BlockingIOError:
                pass
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(errno.EWOULDBLOCK, f"lock held after {timeout:g} s",
                                   os.fspath(target) if own else None)  # fmt: skip
            if not told and on_wait is not None:
                on_wait()
                told = True
            time.sleep(delay if deadline is None else min(delay, deadline - now))
            delay = min(delay * 2, 0.2)
    except BaseException:
        if own:
            os.close(fd)
        raise
