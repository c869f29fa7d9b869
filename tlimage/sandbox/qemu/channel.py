"""The host end of the guest agent's channel: protocol frames (`protocol.py`, runner/PROTOCOL.md)
over a unix stream socket — QEMU's virtio-serial port `tl.ctl`, or a sandbox shim's client
socket, which carries the same frames — with deadlines; and the agent's EXPORT stream unpacked
into an overlay-style upper on the host.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from typing import Protocol

from tlimage.errors import ExecutorError
from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.upper import OPAQUE_XATTR


class Channel:
    """Frames over a unix stream socket, with deadlines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, frame: P.Frame) -> None:
        self.sock.settimeout(30)
        self.sock.sendall(P.encode_frame(frame))

    def _fill(self, n: int, deadline: float | None) -> None:
        while len(self.buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError:
                raise
            except OSError as e:  # QEMU died: connection reset
                raise EOFError(f"the guest channel failed: {e}") from None
            if not chunk:
                raise EOFError("the guest closed the channel")
            self.buf += chunk

    def recv(self, deadline: float | None = None) -> P.Frame:
        self._fill(P.HEADER.size, deadline)
        t, length, session = P.decode_header_session(bytes(self.buf[: P.HEADER.size]))
        self._fill(P.HEADER.size + length, deadline)
        payload = bytes(self.buf[P.HEADER.size : P.HEADER.size + length])
        del self.buf[: P.HEADER.size + length]
        return P.Frame(t, payload, session)


class FrameSource(Protocol):
    def recv(self, deadline: float | None) -> P.Frame: ...


class TarFrames(io.RawIOBase):
    """A readable stream over TAR frames (starting with `first` when given); the first other
    frame ends it and is returned by `finish()`. Closing it does not drain the frames that
    remain: `finish()` does."""

    def __init__(self, source: FrameSource, deadline: float | None = None,
                 first: P.Frame | None = None) -> None:  # fmt: skip
        super().__init__()
        self.source, self.deadline = source, deadline
        self.pending = b""
        self.end: P.Frame | None = None
        if first is not None:
            if first.type is P.FrameType.TAR:
                self.pending = first.payload
            else:
                self.end = first

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - a writable buffer
        while not self.pending and self.end is None:
            f = self.source.recv(self.deadline)
            if f.type is P.FrameType.TAR:
                self.pending = f.payload
            else:
                self.end = f
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        pass  # readers (tarfile, BufferedReader) close it; the frames that remain are ours

    def finish(self) -> P.Frame:
        """Reads to the end of the TAR frames (tar's end-of-archive padding may leave some
        unread) and returns the frame that ended them."""
        while self.end is None:
            self.pending = b""
            self.readinto(bytearray(1 << 16))
        return self.end


def apply_export_end(dest: Path, meta: P.ExportEnd) -> None:
    """The xattrs and opaque markers that travel after an EXPORT's tar, set on `dest` (the
    guest is untrusted: every path stays inside `dest`)."""
    from tlimage._fs import UnsafePathError, setxattr_in_root

    try:
        for rel, name, value in meta.xattrs:
            setxattr_in_root(dest, rel, name, value)
        for rel in meta.opaque:
            setxattr_in_root(dest, rel, OPAQUE_XATTR, b"y")
    except (UnsafePathError, FileNotFoundError) as e:
        raise ExecutorError(f"guest export: unsafe xattr path: {e}") from None


def unpack_export(stream: io.RawIOBase, dest: Path) -> None:
    """Extracts the agent's tar into `dest` as an overlay-style upper: owners, modes, mtimes and
    devices (whiteouts included) are kept; a hard link to a whiteout becomes a fresh 0:0 device.
    The guest is untrusted: `tlimage._fs.Extractor` keeps every entry and link inside `dest`."""
    from tlimage._fs import extract_tar

    extract_tar(io.BufferedReader(stream, 1 << 20), dest, mode="r|", same_owner=True,
                root_entry=True, follow_links=False, error=ExecutorError)  # fmt: skip
