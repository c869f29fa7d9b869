"""Host side of the guest agent protocol (runner/PROTOCOL.md, version 4).

Pure encoding and decoding: no I/O beyond the `FrameReader` helper, so the unit tests pin the
wire format without a VM. The C agent (runner/agent.c) is the other implementation; the two are
kept in step by tests/unit/test_runner_protocol.py, which also runs the real agent in `--stdio`
mode against this module.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

from tlimage.errors import ExecutorError

PROTOCOL_VERSION = 4
MAX_PAYLOAD = 1 << 20
HEADER = struct.Struct(">BBHI")  # type, flags (0), session (v4; was reserved), payload length
MAX_SESSION = 0xFFFF


class ProtocolError(ExecutorError):
    """The channel carried something that is not protocol version 4."""


class FrameType(IntEnum):
    # guest -> host
    HELLO = 0x01
    OK = 0x02
    ERROR = 0x03
    PATH = 0x04  # version 2
    PID = 0x05  # version 4
    STAT = 0x06  # version 4
    STDOUT = 0x10
    STDERR = 0x11
    EXIT = 0x12
    TAR = 0x20
    EXPORT_END = 0x21
    # host -> guest
    MOUNT = 0x81
    RUN = 0x82
    EXPORT = 0x83
    SHUTDOWN = 0x84
    KILL = 0x85
    UMOUNT = 0x86
    # version 2: sandboxes (tlimage/runtime/microvm.py)
    EXEC = 0x87
    PUT = 0x88
    GET = 0x89
    STDIN = 0x8A
    FREEZE = 0x8B
    THAW = 0x8C
    ATTACH = 0x8D
    SPAWN = 0x8E
    SANDBOX = 0x8F
    # version 3: RUN mounts (tlimage/executor/microvm.py)
    BIND = 0x90
    UNBIND = 0x91
    # version 4: sessions, files, terminals, signals
    END = 0x92
    FS = 0x93
    PTY = 0x94
    WINSIZE = 0x95
    SIGNAL = 0x96


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes = b""
    session: int = 0  # version 4: 0 is the main agent's; others are served concurrently


# --- primitive encodings: u32 big-endian lengths, strings are bytes without NUL --------------


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    if b"\0" in b:
        raise ProtocolError(f"strings on the channel cannot contain NUL: {b!r}")
    return _u32(len(b)) + b


def _bytes(b: bytes) -> bytes:
    return _u32(len(b)) + b


def _strlist(items) -> bytes:
    items = list(items)
    return _u32(len(items)) + b"".join(_str(i) for i in items)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.off, self.what = data, 0, what

    def _take(self, n: int) -> bytes:
        if self.off + n > len(self.data):
            raise ProtocolError(f"truncated {self.what} payload")
        b = self.data[self.off : self.off + n]
        self.off += n
        return b

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def bytes(self) -> bytes:
        return self._take(self.u32())

    def str(self) -> str:
        return self._take(self.u32()).decode("utf-8", "surrogateescape")

    def strlist(self) -> list[str]:
        return [self.str() for _ in range(self.u32())]

    def end(self) -> None:
        if self.off != len(self.data):
            raise ProtocolError(
                f"{len(self.data) - self.off} trailing bytes in {self.what} payload"
            )


# --- frames ---------------------------------------------------------------------------------


def encode_frame(frame: Frame) -> bytes:
    if len(frame.payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= frame.session <= MAX_SESSION:
        raise ProtocolError(f"session {frame.session} is out of range")
    return HEADER.pack(int(frame.type), 0, frame.session, len(frame.payload)) + frame.payload


def decode_header(header: bytes) -> tuple[FrameType, int]:
    """(type, payload length) of a frame header; `decode_header_session` adds its session."""
    t, length, _session = decode_header_session(header)
    return t, length


def decode_header_session(header: bytes) -> tuple[FrameType, int, int]:
    ftype, flags, session, length = HEADER.unpack(header)
    try:
        t = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}") from None
    if flags:
        raise ProtocolError(f"frame header has non-zero flags ({flags})")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return t, length, session


def with_session(frame: Frame, session: int) -> Frame:
    return Frame(frame.type, frame.payload, session)


def decode_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Splits a byte string into whole frames; returns them and the incomplete rest."""
    frames, off = [], 0
    while len(data) - off >= HEADER.size:
        t, length, session = decode_header_session(data[off : off + HEADER.size])
        if len(data) - off - HEADER.size < length:
            break
        start = off + HEADER.size
        frames.append(Frame(t, data[start : start + length], session))
        off = start + length
    return frames, data[off:]


class FrameReader:
    """Reads whole frames from a blocking binary stream (a socket's makefile, a pipe)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            b = self.stream.read(left)
            if not b:
                raise EOFError("agent channel closed")
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def read(self) -> Frame:
        t, length, session = decode_header_session(self._read_exact(HEADER.size))
        return Frame(t, self._read_exact(length) if length else b"", session)


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int
    agent: str


def encode_hello(version: int = PROTOCOL_VERSION, agent: str = "tl-agent") -> Frame:
    return Frame(FrameType.HELLO, struct.pack(">H", version) + _str(agent))


def decode_hello(frame: Frame, *, expect: int = PROTOCOL_VERSION) -> Hello:
    """Decodes the agent's first frame; any version other than `expect` is rejected, since
    the host and the agent are provisioned together and a mismatch means a stale initramfs."""
    if frame.type is not FrameType.HELLO:
        raise ProtocolError(f"expected HELLO as the agent's first frame, got {frame.type.name}")
    r = _Reader(frame.payload, "HELLO")
    hello = Hello(r.u16(), r.str())
    r.end()
    if hello.version != expect:
        raise ProtocolError(
            f"guest agent speaks protocol version {hello.version}; this host speaks {expect}",
            hint="the cached initramfs is stale: remove the tlimage cache's executor folder",
        )
    return hello


@dataclass(frozen=True)
class MountRequest:
    lowers: tuple[str, ...]  # bottom -> top, guest paths
    upper: str
    work: str
    target: str


@dataclass(frozen=True)
class RunRequestMsg:
    argv: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE"
    user: str
    workdir: str
    network: bool


@dataclass(frozen=True)
class Exit:
    code: int  # 0-255, or 128 + signal
    signal: int  # 0 when the step exited normally


def encode_mount(m: MountRequest) -> Frame:
    return Frame(
        FrameType.MOUNT, _strlist(m.lowers) + _str(m.upper) + _str(m.work) + _str(m.target)
    )


def decode_mount(frame: Frame) -> MountRequest:
    r = _Reader(frame.payload, "MOUNT")
    m = MountRequest(tuple(r.strlist()), r.str(), r.str(), r.str())
    r.end()
    return m


def encode_run(m: RunRequestMsg) -> Frame:
    if not m.argv:
        raise ProtocolError("RUN needs a non-empty argv")
    payload = _strlist(m.argv) + _strlist(m.env) + _str(m.user) + _str(m.workdir)
    return Frame(FrameType.RUN, payload + bytes([1 if m.network else 0]))


def decode_run(frame: Frame) -> RunRequestMsg:
    r = _Reader(frame.payload, "RUN")
    m = RunRequestMsg(tuple(r.strlist()), tuple(r.strlist()), r.str(), r.str(), bool(r.u8()))
    r.end()
    return m


def encode_export(upper: str) -> Frame:
    return Frame(FrameType.EXPORT, _str(upper))


def encode_umount(target: str) -> Frame:
    return Frame(FrameType.UMOUNT, _str(target))


def encode_kill(signal: int) -> Frame:
    return Frame(FrameType.KILL, bytes([signal]))


def encode_shutdown() -> Frame:
    return Frame(FrameType.SHUTDOWN)


def encode_exit(e: Exit) -> Frame:
    return Frame(FrameType.EXIT, struct.pack(">II", e.code, e.signal))


def decode_exit(frame: Frame) -> Exit:
    r = _Reader(frame.payload, "EXIT")
    e = Exit(r.u32(), r.u32())
    r.end()
    return e


def encode_error(message: str) -> Frame:
    return Frame(FrameType.ERROR, _str(message))


def decode_error(frame: Frame) -> str:
    r = _Reader(frame.payload, "ERROR")
    msg = r.str()
    r.end()
    return msg


@dataclass(frozen=True)
class ExportEnd:
    opaque: tuple[str, ...]  # relative paths ("." = the upper's root)
    xattrs: tuple[tuple[str, str, bytes], ...]  # (relative path, name, value); no trusted.overlay.*


def encode_export_end(e: ExportEnd) -> Frame:
    payload = _strlist(e.opaque) + _u32(len(e.xattrs))
    payload += b"".join(_str(p) + _str(n) + _bytes(v) for p, n, v in e.xattrs)
    return Frame(FrameType.EXPORT_END, payload)


def decode_export_end(frame: Frame) -> ExportEnd:
    r = _Reader(frame.payload, "EXPORT_END")
    opaque = tuple(r.strlist())
    xattrs = tuple((r.str(), r.str(), r.bytes()) for _ in range(r.u32()))
    r.end()
    return ExportEnd(opaque, xattrs)


# --- version 2: sandboxes -------------------------------------------------------------------


@dataclass(frozen=True)
class ExecMsg:
    """EXEC and SPAWN: a command in the sandbox root. `stdin` says whether STDIN frames follow
    (else the program reads /dev/null)."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    user: str
    workdir: str
    stdin: bool = False


@dataclass(frozen=True)
class SandboxMsg:
    root: str
    network: bool
    hostname: str


def _encode_exec(t: FrameType, m: ExecMsg) -> Frame:
    payload = _strlist(m.argv) + _strlist(m.env) + _str(m.user) + _str(m.workdir)
    return Frame(t, payload + bytes([1 if m.stdin else 0]))


def encode_exec(m: ExecMsg) -> Frame:
    return _encode_exec(FrameType.EXEC, m)


def encode_spawn(m: ExecMsg) -> Frame:
    return _encode_exec(FrameType.SPAWN, m)


def decode_exec(frame: Frame) -> ExecMsg:
    r = _Reader(frame.payload, frame.type.name)
    m = ExecMsg(tuple(r.strlist()), tuple(r.strlist()), r.str(), r.str())
    flags = r.u8()
    r.end()
    if flags & ~1:
        raise ProtocolError(f"unknown {frame.type.name} flags 0x{flags:02x}")
    return ExecMsg(m.argv, m.env, m.user, m.workdir, bool(flags & 1))


def encode_sandbox(m: SandboxMsg) -> Frame:
    return Frame(
        FrameType.SANDBOX, _str(m.root) + bytes([1 if m.network else 0]) + _str(m.hostname)
    )


def decode_sandbox(frame: Frame) -> SandboxMsg:
    r = _Reader(frame.payload, "SANDBOX")
    m = SandboxMsg(r.str(), bool(r.u8()), r.str())
    r.end()
    return m


def encode_stdin(data: bytes) -> Frame:
    """The next bytes of a running EXEC's stdin; empty means end of input."""
    return Frame(FrameType.STDIN, data)


def encode_put(dest: str, name: str) -> Frame:
    return Frame(FrameType.PUT, _str(dest) + _str(name))


def decode_put(frame: Frame) -> tuple[str, str]:
    r = _Reader(frame.payload, "PUT")
    dest, name = r.str(), r.str()
    r.end()
    return dest, name


def encode_get(path: str) -> Frame:
    return Frame(FrameType.GET, _str(path))


def encode_tar(chunk: bytes) -> Frame:
    """A chunk of an archive (host to guest during PUT); empty ends the archive."""
    return Frame(FrameType.TAR, chunk)


def encode_path(path: str) -> Frame:
    return Frame(FrameType.PATH, _str(path))


def decode_path(frame: Frame) -> str:
    r = _Reader(frame.payload, "PATH")
    path = r.str()
    r.end()
    return path


def encode_attach(unix_ns: int) -> Frame:
    """Asks the agent to introduce itself again (HELLO) and to set its clock to `unix_ns`."""
    return Frame(FrameType.ATTACH, struct.pack(">Q", unix_ns))


def decode_attach(frame: Frame) -> int:
    if len(frame.payload) != 8:
        raise ProtocolError("ATTACH payload must be 8 bytes")
    return struct.unpack(">Q", frame.payload)[0]


def encode_freeze() -> Frame:
    return Frame(FrameType.FREEZE)


def encode_thaw() -> Frame:
    return Frame(FrameType.THAW)


# --- version 3: RUN mounts --------------------------------------------------------------------


class BindKind(IntEnum):
    PATH = 0  # `source` inside `source_root` (a guest path), bind-mounted
    TMPFS = 1  # a new tmpfs of `size_kib` (0: the kernel's default)
    DATA = 2  # `data` as a file (uid, gid, mode) on a guest tmpfs, bind-mounted read-only


@dataclass(frozen=True)
class BindMsg:
    """One mount for the next RUN, at `target` inside `root` (both resolved inside their root,
    symlinks included). `data` carries a secret: kept out of `repr`."""

    root: str
    target: str
    kind: BindKind
    source_root: str = ""
    source: str = ""
    readonly: bool = True
    size_kib: int = 0
    uid: int = 0
    gid: int = 0
    mode: int = 0o400
    data: bytes = field(default=b"", repr=False)


def encode_bind(m: BindMsg) -> Frame:
    payload = (
        _str(m.root)
        + _str(m.target)
        + bytes([int(m.kind)])
        + _str(m.source_root)
        + _str(m.source)
        + bytes([1 if m.readonly else 0])
        + struct.pack(">IIII", m.size_kib, m.uid, m.gid, m.mode)
        + _bytes(m.data)
    )
    return Frame(FrameType.BIND, payload)


def decode_bind(frame: Frame) -> BindMsg:
    r = _Reader(frame.payload, "BIND")
    root, target, kind = r.str(), r.str(), r.u8()
    try:
        k = BindKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown BIND kind {kind}") from None
    m = BindMsg(root, target, k, r.str(), r.str(), bool(r.u8()), r.u32(), r.u32(), r.u32(),
                r.u32(), r.bytes())  # fmt: skip
    r.end()
    return m


def encode_unbind() -> Frame:
    return Frame(FrameType.UNBIND)


# --- version 4: sessions, files, terminals, signals -------------------------------------------


def encode_end() -> Frame:
    """Ends the session it is sent on (no reply): what runs for it ends as if its host left."""
    return Frame(FrameType.END)


def encode_pid(pid: int) -> Frame:
    return Frame(FrameType.PID, _u32(pid))


def decode_pid(frame: Frame) -> int:
    r = _Reader(frame.payload, "PID")
    pid = r.u32()
    r.end()
    return pid


class FsOp(IntEnum):
    STAT = 0
    LIST = 1
    MKDIR = 2
    REMOVE = 3


class FsFlag(IntEnum):
    FOLLOW = 1  # STAT: describe what a link leads to (inside the root)
    MISSING_OK = 2  # STAT: a missing path answers OK instead of ERROR
    RECURSIVE = 4  # REMOVE: a directory with what it holds
    PARENTS = 8  # MKDIR: missing parents too, and no error when it exists


@dataclass(frozen=True)
class FsMsg:
    op: FsOp
    path: str
    flags: int = 0
    mode: int = 0o755


def encode_fs(m: FsMsg) -> Frame:
    return Frame(FrameType.FS, bytes([int(m.op)]) + _str(m.path) + bytes([m.flags & 0xFF])
                 + _u32(m.mode))  # fmt: skip


def decode_fs(frame: Frame) -> FsMsg:
    r = _Reader(frame.payload, "FS")
    op, path, flags, mode = r.u8(), r.str(), r.u8(), r.u32()
    r.end()
    try:
        return FsMsg(FsOp(op), path, flags, mode)
    except ValueError:
        raise ProtocolError(f"unknown FS operation {op}") from None


FILE_KINDS = ("file", "dir", "symlink", "fifo", "socket", "char", "block")


@dataclass(frozen=True)
class FileStat:
    name: str
    path: str
    type: str  # one of FILE_KINDS
    size: int
    mode: int  # permission bits
    uid: int
    gid: int
    mtime_ns: int
    link_target: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "type": self.type, "size": self.size,
                "mode": self.mode, "uid": self.uid, "gid": self.gid,
                "mtime": self.mtime_ns / 1e9, "link_target": self.link_target}  # fmt: skip


def encode_stat(s: FileStat) -> Frame:
    payload = (_str(s.name) + _str(s.path) + bytes([FILE_KINDS.index(s.type)])
               + struct.pack(">QIIIq", s.size, s.mode, s.uid, s.gid, s.mtime_ns)
               + _str(s.link_target or ""))  # fmt: skip
    return Frame(FrameType.STAT, payload)


def decode_stat(frame: Frame) -> FileStat:
    r = _Reader(frame.payload, "STAT")
    name, path, kind = r.str(), r.str(), r.u8()
    size, mode, uid, gid, mtime = struct.unpack(">QIIIq", r._take(28))
    link = r.str()
    r.end()
    if kind >= len(FILE_KINDS):
        raise ProtocolError(f"unknown file kind {kind} in STAT")
    t = FILE_KINDS[kind]
    return FileStat(name, path, t, size, mode, uid, gid, mtime, link if t == "symlink" else None)


@dataclass(frozen=True)
class PtyMsg:
    """A command on a terminal of the guest, `rows` x `cols` (TERM travels in `env`)."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    user: str
    workdir: str
    rows: int = 24
    cols: int = 80


def encode_pty(m: PtyMsg) -> Frame:
    if not m.argv:
        raise ProtocolError("PTY needs a non-empty argv")
    payload = _strlist(m.argv) + _strlist(m.env) + _str(m.user) + _str(m.workdir) + b"\0"
    return Frame(FrameType.PTY, payload + struct.pack(">HH", m.rows & 0xFFFF, m.cols & 0xFFFF))


def decode_pty(frame: Frame) -> PtyMsg:
    r = _Reader(frame.payload, "PTY")
    argv, env, user, workdir = tuple(r.strlist()), tuple(r.strlist()), r.str(), r.str()
    if r.u8():
        raise ProtocolError("PTY flags must be 0")
    rows, cols = r.u16(), r.u16()
    r.end()
    return PtyMsg(argv, env, user, workdir, rows, cols)


def encode_winsize(rows: int, cols: int) -> Frame:
    return Frame(FrameType.WINSIZE, struct.pack(">HH", rows & 0xFFFF, cols & 0xFFFF))


def encode_signal(pid: int, signal: int) -> Frame:
    return Frame(FrameType.SIGNAL, _u32(pid) + bytes([signal]))


def decode_signal(frame: Frame) -> tuple[int, int]:
    r = _Reader(frame.payload, "SIGNAL")
    pid, sig = r.u32(), r.u8()
    r.end()
    return pid, sig
