"""`sb.files`: read, write, list, stat, mkdir and remove paths inside a running sandbox.

Paths are absolute paths of the sandbox and resolve inside its root exactly as `cp` does (a
link planted in the sandbox cannot lead outside it). Reads and writes go through the
backend's copy primitives; metadata comes from the backend's `fs` operation.
"""

from __future__ import annotations

import os
import shutil
import stat as S
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlimage.errors import RuntimeError_

if TYPE_CHECKING:
    from tlimage.runtime._api import Sandbox

MAX_READ = 512 * 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: str  # file, dir, symlink, fifo, socket, char, block
    size: int
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    mtime: float
    link_target: str | None = None

    @property
    def mode_str(self) -> str:
        return S.filemode(self.mode | _TYPE_BITS.get(self.type, 0))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"] = f"{self.mode:04o}"
        return d


_TYPE_BITS = {"file": S.S_IFREG, "dir": S.S_IFDIR, "symlink": S.S_IFLNK, "fifo": S.S_IFIFO,
              "socket": S.S_IFSOCK, "char": S.S_IFCHR, "block": S.S_IFBLK}  # fmt: skip


def _abs(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise RuntimeError_(f"sandbox paths must be absolute, got {path!r}")
    if "\0" in path:
        raise RuntimeError_("sandbox paths cannot contain NUL bytes")
    return path


class SandboxFiles:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    def _fs(self, op: str, path: str, **args: Any) -> Any:
        rec = self._sb._running(f"{op} files")
        be = self._sb._backend()
        if not hasattr(be, "fs"):
            raise RuntimeError_(f"file operations are not available on the {rec.backend} "
                                "backend yet; use cp")  # fmt: skip
        return be.fs(rec, op, _abs(path), **args)

    def stat(self, path: str) -> FileInfo:
        """The path's metadata (a symlink is described, not followed)."""
        return FileInfo(**self._fs("stat", path))

    def exists(self, path: str) -> bool:
        return self._fs("stat", path, missing_ok=True) is not None

    def list(self, path: str = "/") -> list[FileInfo]:
        """The entries of a directory, sorted by name."""
        return [FileInfo(**e) for e in self._fs("list", path)]

    def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> FileInfo:
        return FileInfo(**self._fs("mkdir", path, parents=parents, perm=mode))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, link or (empty, or any with `recursive`) directory."""
        self._fs("remove", path, recursive=recursive)

    def read(self, path: str) -> bytes:
        """A file's bytes (a link to a file is followed inside the sandbox)."""
        info = self._fs("stat", path, follow=True)
        if info["type"] == "dir":
            raise RuntimeError_(f"{path}: is a directory; list it with files.list")
        if info["size"] > MAX_READ:
            raise RuntimeError_(f"{path}: larger than {MAX_READ >> 20} MiB; use cp")
        tmp = Path(tempfile.mkdtemp(prefix="tl-read-"))
        try:
            got = self._sb.cp_out(info["path"], tmp / "f")
            if got.is_symlink() or not got.is_file():
                raise RuntimeError_(f"{path}: not a regular file")
            return got.read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> FileInfo:
        """Creates or replaces a file (its folder must exist)."""
        _abs(path)
        if path.endswith("/"):
            raise RuntimeError_(f"{path}: a file path cannot end with '/'")
        if isinstance(data, str):
            data = data.encode()
        cur = self._fs("stat", path, missing_ok=True)
        if cur is not None and cur["type"] == "dir":
            raise RuntimeError_(f"{path}: is a directory")
        tmp = Path(tempfile.mkdtemp(prefix="tl-write-"))
        try:
            f = tmp / (os.path.basename(path) or "f")
            f.write_bytes(data)
            os.chmod(f, mode & 0o7777)
            self._sb.cp_in(f, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.stat(path)
