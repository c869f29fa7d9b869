"""Pins runner/PROTOCOL.md (version 4): golden bytes, round trips, rejection rules, and the real
agent (compiled here, run in `--stdio` mode) answering the version 2 sandbox requests, the
version 3 RUN mount requests and the version 4 sessions (concurrent requests), file operations,
terminals and signals."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlimage.sandbox.qemu import protocol as P

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
texts = st.lists(text, max_size=6).map(tuple)


def test_version_is_four():
    assert P.PROTOCOL_VERSION == 4


def test_run_frame_golden_bytes_match_the_spec_example():
    frame = P.encode_run(P.RunRequestMsg(("true",), ("PATH=/bin",), "root", "/", False))
    wire = P.encode_frame(frame)
    expected = bytes.fromhex(
        "82 00 0000 0000002b"
        "00000001 00000004 74727565"
        "00000001 00000009 504154483d2f62696e"
        "00000004 726f6f74"
        "00000001 2f"
        "00".replace(" ", "")
    )
    assert wire == expected


def test_hello_golden_bytes():
    wire = P.encode_frame(P.encode_hello())
    assert wire == bytes.fromhex("01000000 0000000e 0004 00000008") + b"tl-agent"


def test_v2_golden_bytes():
    exec_ = P.encode_exec(P.ExecMsg(("true",), ("PATH=/bin",), "root", "/", stdin=True))
    assert P.encode_frame(exec_) == bytes.fromhex(
        "87 00 0000 0000002b"
        "00000001 00000004 74727565"
        "00000001 00000009 504154483d2f62696e"
        "00000004 726f6f74"
        "00000001 2f"
        "01".replace(" ", "")
    )
    assert P.encode_frame(P.encode_attach(0x0102030405060708)) == bytes.fromhex(
        "8d000000 00000008 0102030405060708"
    )
    assert P.encode_frame(P.encode_put("/tmp", "f")) == bytes.fromhex(
        "88000000 0000000d 00000004 2f746d70 00000001 66".replace(" ", "")
    )
    assert P.encode_frame(P.encode_sandbox(P.SandboxMsg("/tl/root", True, "h"))) == bytes.fromhex(
        "8f000000 00000012 00000008 2f746c2f726f6f74 01 00000001 68".replace(" ", "")
    )
    assert P.encode_frame(P.encode_stdin(b"")) == bytes.fromhex("8a000000 00000000")


@given(texts.filter(bool), texts, text, text, st.booleans())
def test_run_round_trip(argv, env, user, workdir, network):
    msg = P.RunRequestMsg(argv, env, user, workdir, network)
    frames, rest = P.decode_frames(P.encode_frame(P.encode_run(msg)))
    assert rest == b"" and len(frames) == 1
    assert P.decode_run(frames[0]) == msg


@given(texts.filter(bool), texts, text, text, st.booleans())
def test_exec_and_spawn_round_trip(argv, env, user, workdir, stdin):
    msg = P.ExecMsg(argv, env, user, workdir, stdin)
    assert P.decode_exec(P.encode_exec(msg)) == msg
    assert P.decode_exec(P.encode_spawn(msg)) == msg


@given(text, st.booleans(), text, text, text, st.integers(0, 2**64 - 1))
def test_v2_round_trips(root, network, hostname, dest, name, ns):
    assert P.decode_sandbox(
        P.encode_sandbox(P.SandboxMsg(root, network, hostname))
    ) == P.SandboxMsg(root, network, hostname)
    assert P.decode_put(P.encode_put(dest, name)) == (dest, name)
    assert P.decode_path(P.encode_path(dest)) == dest
    assert P.decode_attach(P.encode_attach(ns)) == ns


def test_v3_golden_bytes():
    bind = P.BindMsg("/r", "/t", P.BindKind.DATA, uid=1, gid=2, mode=0o400, data=b"s")
    assert P.encode_frame(P.encode_bind(bind)) == bytes.fromhex(
        "90 00 0000 0000002b"
        "00000002 2f72"  # root
        "00000002 2f74"  # target
        "02"  # kind: data
        "00000000 00000000"  # source_root, source
        "01"  # readonly
        "00000000 00000001 00000002 00000100"  # size_kib, uid, gid, mode
        "00000001 73".replace(" ", "")  # data
    )
    assert P.encode_frame(P.encode_unbind()) == bytes.fromhex("91000000 00000000")
    assert "data" not in repr(bind).replace("data=", "") and "b's'" not in repr(bind)


@given(
    text,
    text,
    st.sampled_from(list(P.BindKind)),
    text,
    text,
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
def test_bind_round_trip(root, target, kind, source_root, source, readonly, n, data):
    m = P.BindMsg(root, target, kind, source_root, source, readonly, n, n, n, n, data)
    assert P.decode_bind(P.encode_bind(m)) == m


def test_bind_kind_beyond_data_is_rejected():
    frame = P.encode_bind(P.BindMsg("/r", "/t", P.BindKind.TMPFS))
    payload = bytearray(frame.payload)
    payload[len(P._str("/r") + P._str("/t"))] = 7
    with pytest.raises(P.ProtocolError, match="unknown BIND kind 7"):
        P.decode_bind(P.Frame(P.FrameType.BIND, bytes(payload)))


def test_exec_flags_beyond_stdin_are_rejected():
    frame = P.encode_exec(P.ExecMsg(("x",), (), "root", "/"))
    with pytest.raises(P.ProtocolError, match="unknown EXEC flags 0x02"):
        P.decode_exec(P.Frame(P.FrameType.EXEC, frame.payload[:-1] + b"\x02"))


@given(texts.filter(bool), text, text, text)
def test_mount_round_trip(lowers, upper, work, target):
    m = P.MountRequest(lowers, upper, work, target)
    assert P.decode_mount(P.encode_mount(m)) == m


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_exit_round_trip(code, sig):
    assert P.decode_exit(P.encode_exit(P.Exit(code, sig))) == P.Exit(code, sig)


@given(texts, st.lists(st.tuples(text, text, st.binary(max_size=20)), max_size=5).map(tuple))
def test_export_end_round_trip(opaque, xattrs):
    e = P.ExportEnd(opaque, xattrs)
    assert P.decode_export_end(P.encode_export_end(e)) == e


@given(
    st.lists(st.tuples(st.sampled_from(list(P.FrameType)), st.binary(max_size=64)), max_size=8),
    st.integers(0, 200),
)
def test_decode_frames_handles_any_split(frames, cut):
    wire = b"".join(P.encode_frame(P.Frame(t, p)) for t, p in frames)
    cut = min(cut, len(wire))
    first, rest = P.decode_frames(wire[:cut])
    second, rest2 = P.decode_frames(rest + wire[cut:])
    assert rest2 == b""
    assert [(f.type, f.payload) for f in first + second] == frames


def test_version_mismatch_is_rejected():
    with pytest.raises(P.ProtocolError, match="version 1; this host speaks 4") as e:
        P.decode_hello(P.encode_hello(version=1))
    assert "stale" in (e.value.hint or "")


def test_first_frame_must_be_hello():
    with pytest.raises(P.ProtocolError, match="expected HELLO"):
        P.decode_hello(P.Frame(P.FrameType.OK))


@pytest.mark.parametrize(
    "header, match",
    [
        (struct.pack(">BBHI", 0x7F, 0, 0, 0), "unknown frame type 0x7f"),
        (struct.pack(">BBHI", 0x02, 1, 0, 0), "non-zero flags"),
        (struct.pack(">BBHI", 0x02, 0, 0, P.MAX_PAYLOAD + 1), "exceeds"),
    ],
)
def test_bad_headers_are_rejected(header, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode_header(header)


def test_trailing_and_truncated_payloads_are_rejected():
    good = P.encode_exit(P.Exit(1, 0))
    with pytest.raises(P.ProtocolError, match="trailing"):
        P.decode_exit(P.Frame(P.FrameType.EXIT, good.payload + b"x"))
    with pytest.raises(P.ProtocolError, match="truncated"):
        P.decode_exit(P.Frame(P.FrameType.EXIT, good.payload[:5]))


def test_nul_in_strings_is_refused_on_encode():
    with pytest.raises(P.ProtocolError, match="NUL"):
        P.encode_run(P.RunRequestMsg(("a\0b",), (), "root", "/", False))


def test_oversized_frame_is_refused_on_encode():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.encode_frame(P.Frame(P.FrameType.TAR, b"x" * (P.MAX_PAYLOAD + 1)))


# --- the real agent, version 2 requests, in --stdio mode (no VM: the root is "/") -------------


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt-get install gcc libc6-dev)")
    out = tmp_path_factory.mktemp("agent") / "agent"
    src = Path(__file__).resolve().parents[2] / "runner" / "agent.c"
    subprocess.run(
        [gcc, "-static", "-Os", "-o", str(out), str(src)], check=True, capture_output=True
    )
    return out


def _as_background_job() -> None:
    """What a shell's background job (`cmd &`, nohup) inherits: SIGINT and SIGQUIT ignored,
    and here SIGUSR1 blocked too."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


class Agent:
    def __init__(self, binary: Path, env: dict[str, str] | None = None,
                 background: bool = False) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            [str(binary), "--stdio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
            preexec_fn=_as_background_job if background else None,
        )
        self.reader = P.FrameReader(self.proc.stdout)
        self.err = bytearray()
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        assert P.decode_hello(self.reader.read()).version == P.PROTOCOL_VERSION

    def _drain(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk

    def stderr_text(self) -> str:
        return bytes(self.err).decode()

    def send(self, frame: P.Frame) -> None:
        self.proc.stdin.write(P.encode_frame(frame))
        self.proc.stdin.flush()

    def until(self, *types: P.FrameType) -> list[P.Frame]:
        frames = []
        while True:
            f = self.reader.read()
            frames.append(f)
            if f.type in types:
                return frames

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.drain.join(10)


def _out(frames: list[P.Frame], t: P.FrameType) -> bytes:
    return b"".join(f.payload for f in frames if f.type is t)


def test_agent_programs_start_with_default_signals(agent_bin):
    """An agent started as a background job (SIGINT and SIGQUIT ignored, a signal blocked)
    starts its programs with every signal at its default action: an ignored one survives exec,
    and Ctrl-C or `kill -INT` would do nothing (a PTY session then never ended)."""
    a = Agent(agent_bin, background=True)
    for msg in (P.encode_exec(P.ExecMsg(("cat", "/proc/self/status"), ("PATH=/usr/bin:/bin",),
                                        "root", "/")),  # fmt: skip
                P.encode_pty(P.PtyMsg(("cat", "/proc/self/status"), ("PATH=/usr/bin:/bin",),
                                      "root", "/", 24, 80))):  # fmt: skip
        a.send(msg)
        frames = a.until(P.FrameType.EXIT, P.FrameType.ERROR)
        status = _out(frames, P.FrameType.STDOUT).decode()
        assert "SigIgn:\t0000000000000000" in status, status
        assert "SigBlk:\t0000000000000000" in status, status
    a.close()


def test_agent_exec_streams_takes_stdin_and_does_not_wait_for_background_writers(agent_bin):
    a = Agent(agent_bin)
    a.send(
        P.encode_exec(
            P.ExecMsg(
                ("sh", "-c", "echo out; echo err >&2; tr a-z A-Z; exit 3"),
                ("PATH=/usr/bin:/bin",),
                "root",
                "/",
                stdin=True,
            )
        )
    )
    a.send(P.encode_stdin(b"piped "))
    a.send(P.encode_stdin(b"input\n"))
    a.send(P.encode_stdin(b""))
    frames = a.until(P.FrameType.EXIT, P.FrameType.ERROR)
    assert P.decode_exit(frames[-1]) == P.Exit(3, 0)
    assert _out(frames, P.FrameType.STDOUT) == b"out\nPIPED INPUT\n"
    assert _out(frames, P.FrameType.STDERR) == b"err\n"
    # A background process keeps stdout open: EXIT still follows the program's own exit.
    a.send(
        P.encode_exec(
            P.ExecMsg(("sh", "-c", "sleep 30 & echo started"), ("PATH=/usr/bin:/bin",), "root", "/")
        )
    )
    frames = a.until(P.FrameType.EXIT, P.FrameType.ERROR)
    assert P.decode_exit(frames[-1]).code == 0 and _out(frames, P.FrameType.STDOUT) == b"started\n"
    a.send(P.encode_exec(P.ExecMsg(("no-such-program",), ("PATH=/usr/bin:/bin",), "root", "/")))
    err = a.until(P.FrameType.EXIT, P.FrameType.ERROR)[-1]
    assert "executable file not found" in P.decode_error(err)
    a.send(P.encode_attach(0))
    assert P.decode_hello(a.until(P.FrameType.HELLO)[-1]).version == P.PROTOCOL_VERSION
    a.send(P.encode_freeze())  # no-ops on a host, but answered
    a.send(P.encode_thaw())
    assert [f.type for f in a.until(P.FrameType.OK)] == [P.FrameType.OK]
    assert [f.type for f in a.until(P.FrameType.OK)] == [P.FrameType.OK]
    a.close()


def test_agent_kill_during_exec(agent_bin):
    a = Agent(agent_bin)
    a.send(P.encode_exec(P.ExecMsg(("sleep", "30"), ("PATH=/usr/bin:/bin",), "root", "/")))
    a.send(P.encode_kill(15))
    assert P.decode_exit(a.until(P.FrameType.EXIT)[-1]) == P.Exit(128 + 15, 15)
    a.close()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed")
def test_agent_put_and_get(agent_bin, tmp_path):
    a = Agent(agent_bin, {"TL_TAR": "/bin/busybox"})
    dest = tmp_path / "box"
    dest.mkdir()
    a.send(P.encode_put(str(dest) + "/", "notes.txt"))
    target = P.decode_path(a.until(P.FrameType.PATH, P.FrameType.ERROR)[-1])
    assert target == f"{dest}/notes.txt"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("notes.txt")
        ti.size, ti.mode = 6, 0o640
        tf.addfile(ti, io.BytesIO(b"hello\n"))
    data = buf.getvalue()
    a.send(P.encode_tar(data[:700]))
    a.send(P.encode_tar(data[700:]))
    a.send(P.encode_tar(b""))
    assert a.until(P.FrameType.OK, P.FrameType.ERROR)[-1].type is P.FrameType.OK
    assert (dest / "notes.txt").read_text() == "hello\n"
    assert (dest / "notes.txt").stat().st_mode & 0o777 == 0o640

    a.send(P.encode_put(str(dest / "missing" / "x"), "x"))
    assert "no such directory" in P.decode_error(a.until(P.FrameType.PATH, P.FrameType.ERROR)[-1])

    a.send(P.encode_get(str(dest)))
    frames = a.until(P.FrameType.OK, P.FrameType.ERROR)
    assert frames[-1].type is P.FrameType.OK
    with tarfile.open(fileobj=io.BytesIO(_out(frames, P.FrameType.TAR))) as tf:
        names = sorted(m.name.rstrip("/") for m in tf.getmembers())
    assert names == ["box", "box/notes.txt"]
    a.send(P.encode_get(str(dest / "nope")))
    assert "No such file" in P.decode_error(a.until(P.FrameType.OK, P.FrameType.ERROR)[-1])
    a.close()


def test_agent_spawn_reports_the_entrypoint_exit(agent_bin):
    a = Agent(agent_bin)
    a.send(P.encode_sandbox(P.SandboxMsg("/", False, "")))
    assert a.until(P.FrameType.OK, P.FrameType.ERROR)[-1].type is P.FrameType.OK
    a.send(P.encode_spawn(P.ExecMsg(("nope",), ("PATH=/usr/bin:/bin",), "root", "/")))
    err = a.until(P.FrameType.OK, P.FrameType.ERROR)[-1]
    assert "executable file not found" in P.decode_error(err)
    a.send(
        P.encode_spawn(
            P.ExecMsg(("sh", "-c", "echo entry; exit 4"), ("PATH=/usr/bin:/bin",), "root", "/")
        )
    )
    assert a.until(P.FrameType.OK, P.FrameType.ERROR)[-1].type is P.FrameType.OK
    # The agent notices the exit between requests (on a host it only reports it).
    deadline = time.monotonic() + 10
    while "entrypoint exited" not in a.stderr_text() and time.monotonic() < deadline:
        a.send(P.encode_attach(0))
        a.until(P.FrameType.HELLO)
        time.sleep(0.01)
    a.close()
    assert "entry\n" in a.stderr_text()
    assert "tl-agent: entrypoint exited with status 4\n" in a.stderr_text()


# --- the real agent, version 3 RUN mounts (in its own mount namespace) -------------------------


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is not installed")
def test_agent_bind_and_unbind(agent_bin, tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("in-root\n")
    (root / "lnk").symlink_to("/etc")  # resolves inside the root, never to the host's /etc
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("from-source\n")
    a = Agent.__new__(Agent)
    a.proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", str(agent_bin), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    a.reader = P.FrameReader(a.proc.stdout)
    a.err = bytearray()
    a.drain = threading.Thread(target=a._drain, daemon=True)
    a.drain.start()
    assert P.decode_hello(a.reader.read()).version == 4
    r = str(root)

    def bind(msg: P.BindMsg) -> P.Frame:
        a.send(P.encode_bind(msg))
        return a.until(P.FrameType.OK, P.FrameType.ERROR)[-1]

    assert bind(P.BindMsg(r, "/mnt/src", P.BindKind.PATH, str(src), "/sub")).type is P.FrameType.OK
    assert (
        bind(P.BindMsg(r, "/tmp/t", P.BindKind.TMPFS, size_kib=1024, readonly=False)).type
        is P.FrameType.OK
    )
    assert (
        bind(
            P.BindMsg(
                r, "/lnk/secret", P.BindKind.DATA, uid=1000, gid=1000, mode=0o440, data=b"s3cret"
            )
        ).type
        is P.FrameType.OK
    )
    bad = bind(P.BindMsg(r, "/etc/hostname/x", P.BindKind.TMPFS))
    assert "BIND: mount target /etc/hostname/x: Not a directory" in P.decode_error(bad)
    missing = bind(P.BindMsg(r, "/x", P.BindKind.PATH, str(src), "/missing"))
    assert P.decode_error(missing) == "BIND: source /missing: No such file or directory"
    script = (
        f"cat {r}/mnt/src/f; stat -c '%a %u' {r}/etc/secret; cat {r}/etc/secret; echo; "
        f"touch {r}/mnt/src/new 2>/dev/null || echo read-only; "
        f"df -k {r}/tmp/t | tail -1 | awk '{{print $2}}'; touch {r}/tmp/t/x"
    )
    a.send(P.encode_run(P.RunRequestMsg(("sh", "-c", script), ("PATH=/usr/bin:/bin",), "root",
                                        "/", False)))  # fmt: skip
    frames = a.until(P.FrameType.EXIT, P.FrameType.ERROR)
    assert _out(frames, P.FrameType.STDOUT) == b"from-source\n440 1000\ns3cret\nread-only\n1024\n"
    assert not Path("/etc/secret").exists()
    a.send(P.encode_unbind())
    assert a.until(P.FrameType.OK)[-1].type is P.FrameType.OK
    # every stub is gone: the root holds what it held before
    assert sorted(os.listdir(root)) == ["etc", "lnk"] and os.listdir(root / "etc") == ["hostname"]
    assert os.listdir(src / "sub") == ["f"]
    a.close()


# --- version 4: sessions, files, terminals, signals ----------------------------------------------

SH = ("PATH=/usr/bin:/bin",)


def test_v4_golden_bytes_and_round_trips():
    assert P.encode_frame(P.Frame(P.FrameType.END, b"", 0x0102)) == bytes.fromhex(
        "92000102 00000000"
    )
    assert P.encode_frame(P.encode_fs(P.FsMsg(P.FsOp.MKDIR, "/a", P.FsFlag.PARENTS, 0o700))) == (
        bytes.fromhex("93000000 0000000c 02 00000002") + b"/a" + bytes.fromhex("08 000001c0")
    )
    assert P.encode_frame(P.encode_signal(0x1234, 15)) == bytes.fromhex(
        "96000000 00000005 000012340f"
    )
    assert P.encode_frame(P.encode_winsize(40, 120)) == bytes.fromhex("95000000 00000004 00280078")
    assert P.decode_pid(P.encode_pid(77)) == 77
    pty = P.PtyMsg(("sh",), ("TERM=xterm",), "root", "/", 30, 100)
    assert P.decode_pty(P.encode_pty(pty)) == pty
    fs = P.FsMsg(P.FsOp.REMOVE, "/x/y", P.FsFlag.RECURSIVE, 0)
    assert P.decode_fs(P.encode_fs(fs)) == fs
    s = P.FileStat("l", "/l", "symlink", 4, 0o777, 1, 2, -5, "/etc")
    assert P.decode_stat(P.encode_stat(s)) == s
    frames, rest = P.decode_frames(P.encode_frame(P.Frame(P.FrameType.OK, b"", 9)))
    assert frames == [P.Frame(P.FrameType.OK, b"", 9)] and rest == b""
    with pytest.raises(P.ProtocolError, match="out of range"):
        P.encode_frame(P.Frame(P.FrameType.OK, b"", 1 << 16))
    with pytest.raises(P.ProtocolError, match="unknown FS operation"):
        P.decode_fs(P.Frame(P.FrameType.FS, b"\x09" + P.encode_fs(fs).payload[1:]))


class Sessions:
    """The agent's frames sorted by session, read as they come."""

    def __init__(self, agent: Agent) -> None:
        self.a = agent
        self.queues: dict[int, list[P.Frame]] = {}

    def send(self, session: int, frame: P.Frame) -> None:
        self.a.send(P.with_session(frame, session))

    def until(self, session: int, *types: P.FrameType, timeout: float = 20) -> list[P.Frame]:
        got: list[P.Frame] = []
        q = self.queues.setdefault(session, [])
        deadline = time.monotonic() + timeout
        while True:
            while q:
                f = q.pop(0)
                got.append(f)
                if f.type in types:
                    return got
            assert time.monotonic() < deadline, f"session {session}: no {types} in {got}"
            f = self.a.reader.read()
            self.queues.setdefault(f.session, []).append(f)

    def reply(self, session: int, frame: P.Frame) -> P.Frame:
        self.send(session, frame)
        return self.until(session, P.FrameType.OK, P.FrameType.ERROR, P.FrameType.STAT,
                          P.FrameType.EXIT)[-1]  # fmt: skip


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return True
        except (FileNotFoundError, ProcessLookupError):  # gone between open and read
            return True
        time.sleep(0.05)
    return False


def test_agent_sessions_run_requests_at_the_same_time(agent_bin):
    a = Agent(agent_bin)
    s = Sessions(a)
    # session 1 waits for its stdin while session 2 runs to its end
    s.send(1, P.encode_exec(P.ExecMsg(("cat",), SH, "root", "/", stdin=True)))
    assert s.until(1, P.FrameType.PID)[-1].type is P.FrameType.PID
    s.send(2, P.encode_exec(P.ExecMsg(("echo", "two"), SH, "root", "/")))
    frames = s.until(2, P.FrameType.EXIT)
    assert frames[0].type is P.FrameType.PID and P.decode_exit(frames[-1]) == P.Exit(0, 0)
    assert _out(frames, P.FrameType.STDOUT) == b"two\n"
    s.send(1, P.encode_stdin(b"one\n"))
    s.send(1, P.encode_stdin(b""))
    frames = s.until(1, P.FrameType.EXIT)
    assert _out(frames, P.FrameType.STDOUT) == b"one\n" and P.decode_exit(frames[-1]).code == 0
    # a session serves requests one after another; session 0 still serves the main agent's
    assert s.reply(1, P.encode_exec(P.ExecMsg(("true",), SH, "root", "/"))).type is P.FrameType.EXIT
    s.send(0, P.encode_attach(0))
    assert s.until(0, P.FrameType.HELLO)[-1].type is P.FrameType.HELLO
    # SIGNAL from another session reaches the process a PID frame named
    s.send(3, P.encode_exec(P.ExecMsg(("sleep", "30"), SH, "root", "/")))
    pid = P.decode_pid(s.until(3, P.FrameType.PID)[-1])
    assert s.reply(4, P.encode_signal(pid, 15)).type is P.FrameType.OK
    assert P.decode_exit(s.until(3, P.FrameType.EXIT)[-1]) == P.Exit(143, 15)
    bad = s.reply(4, P.encode_signal(a.proc.pid, 9))
    assert "not the sandbox's" in P.decode_error(bad)
    assert "No such process" in P.decode_error(s.reply(4, P.encode_signal(pid, 15)))
    # END: what the session runs ends with it
    s.send(5, P.encode_exec(P.ExecMsg(("sleep", "30"), SH, "root", "/")))
    pid = P.decode_pid(s.until(5, P.FrameType.PID)[-1])
    s.send(5, P.encode_end())
    assert _gone(pid)
    # the main agent's requests are refused on other sessions
    m = s.reply(6, P.encode_mount(P.MountRequest(("/a",), "/u", "/w", "/t")))
    assert "only valid on session 0" in P.decode_error(m)
    a.close()


def test_agent_programs_get_no_descriptor_of_the_agent(agent_bin):
    a = Agent(agent_bin)
    s = Sessions(a)
    for session in (0, 1):
        s.send(session, P.encode_exec(P.ExecMsg(("ls", "/proc/self/fd"), SH, "root", "/")))
        frames = s.until(session, P.FrameType.EXIT)
        # 3 is ls's own listing of the folder
        assert _out(frames, P.FrameType.STDOUT).split() == [b"0", b"1", b"2", b"3"], session
    a.close()


def _stat(s: Sessions, path: str, flags: int = 0) -> P.FileStat | str | None:
    f = s.reply(1, P.encode_fs(P.FsMsg(P.FsOp.STAT, path, flags)))
    if f.type is P.FrameType.ERROR:
        return P.decode_error(f)
    return P.decode_stat(f) if f.type is P.FrameType.STAT else None


def test_agent_file_operations_stay_inside_the_root(agent_bin, tmp_path):
    import os

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("in-root\n")
    (root / "d").mkdir()
    (root / "d" / "f").write_text("abc")
    os.chmod(root / "d" / "f", 0o640)
    (root / "link").symlink_to("/etc")  # inside the root, never the host's /etc
    (root / "up").symlink_to("../../../../..")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file")
    (root / "t").mkdir()
    (root / "t" / "escape").symlink_to(outside)
    a = Agent(agent_bin)
    s = Sessions(a)
    assert s.reply(0, P.encode_sandbox(P.SandboxMsg(str(root), False, ""))).type is P.FrameType.OK

    f = _stat(s, "/d/f")
    assert isinstance(f, P.FileStat)
    assert (f.name, f.path, f.type, f.size, f.mode) == ("f", "/d/f", "file", 3, 0o640)
    lk = _stat(s, "/link")
    assert isinstance(lk, P.FileStat) and (lk.type, lk.link_target) == ("symlink", "/etc")
    followed = _stat(s, "/link", P.FsFlag.FOLLOW)
    assert isinstance(followed, P.FileStat)
    assert (followed.type, followed.path, followed.name) == ("dir", "/etc", "etc")
    assert _stat(s, "/nope", P.FsFlag.MISSING_OK) is None
    assert "/nope: No such file or directory" in str(_stat(s, "/nope"))
    root_stat = _stat(s, "/")
    assert isinstance(root_stat, P.FileStat) and root_stat.path == "/"

    def ls(path: str) -> list[str] | str:
        s.send(1, P.encode_fs(P.FsMsg(P.FsOp.LIST, path)))
        frames = s.until(1, P.FrameType.OK, P.FrameType.ERROR)
        if frames[-1].type is P.FrameType.ERROR:
            return P.decode_error(frames[-1])
        return [P.decode_stat(x).path for x in frames if x.type is P.FrameType.STAT]

    assert ls("/link") == ["/link/hostname"]
    names = ["d", "etc", "link", "t", "up"]
    assert ls("/up") == [f"/up/{n}" for n in names]  # the link's ".." stops at the root
    assert ls("/../..") == [f"/{n}" for n in names]
    assert "not a directory" in str(ls("/d/f"))

    def fs(op: P.FsOp, path: str, flags: int = 0) -> P.Frame:
        return s.reply(1, P.encode_fs(P.FsMsg(op, path, flags, 0o750)))

    assert fs(P.FsOp.MKDIR, "/link/new").type is P.FrameType.STAT
    assert (root / "etc" / "new").is_dir() and not Path("/etc/new").exists()
    assert "File exists" in P.decode_error(fs(P.FsOp.MKDIR, "/link/new"))
    made = fs(P.FsOp.MKDIR, "/a/b/c", P.FsFlag.PARENTS)
    assert P.decode_stat(made).path == "/a/b/c" and (root / "a" / "b" / "c").is_dir()
    assert fs(P.FsOp.MKDIR, "/a/b/c", P.FsFlag.PARENTS).type is P.FrameType.STAT
    assert "Directory not empty" in P.decode_error(fs(P.FsOp.REMOVE, "/a"))
    assert fs(P.FsOp.REMOVE, "/a", P.FsFlag.RECURSIVE).type is P.FrameType.OK
    assert not (root / "a").exists()
    assert fs(P.FsOp.REMOVE, "/t", P.FsFlag.RECURSIVE).type is P.FrameType.OK  # link not followed
    assert (outside / "keep").read_text() == "host file"
    assert fs(P.FsOp.REMOVE, "/link").type is P.FrameType.OK
    assert not (root / "link").exists() and (root / "etc" / "hostname").exists()
    assert "cannot be removed" in P.decode_error(fs(P.FsOp.REMOVE, "/"))
    a.close()


def test_agent_pty_size_term_input_ctrl_c_and_resize(agent_bin):
    if not Path("/dev/ptmx").exists():
        pytest.skip("no /dev/ptmx")
    a = Agent(agent_bin)
    s = Sessions(a)
    env = ("PATH=/usr/bin:/bin", "TERM=xterm-256color")
    script = "tty; echo TERM=$TERM; stty size; read x; echo got $x; exit 5"
    s.send(1, P.encode_pty(P.PtyMsg(("sh", "-c", script), env, "root", "/", 30, 100)))
    out = b""
    while b"30 100" not in out:
        out += _out(s.until(1, P.FrameType.STDOUT), P.FrameType.STDOUT)
    assert b"/dev/pts/" in out and b"TERM=xterm-256color" in out
    s.send(1, P.encode_stdin(b"hello\r"))
    frames = s.until(1, P.FrameType.EXIT)
    assert b"got hello" in _out(frames, P.FrameType.STDOUT)
    assert P.decode_exit(frames[-1]).code == 5

    script = ('trap "echo INT; exit 7" INT; trap "stty size" WINCH; echo ready; '
              "while :; do sleep 0.05; done")  # fmt: skip
    s.send(2, P.encode_pty(P.PtyMsg(("sh", "-c", script), env, "root", "/", 24, 80)))
    out = b""
    while b"ready" not in out:
        out += _out(s.until(2, P.FrameType.STDOUT), P.FrameType.STDOUT)
    s.send(2, P.encode_winsize(40, 120))
    while b"40 120" not in out:
        out += _out(s.until(2, P.FrameType.STDOUT), P.FrameType.STDOUT)
    s.send(2, P.encode_stdin(b"\x03"))  # Ctrl-C, as typed: the terminal makes it SIGINT
    frames = s.until(2, P.FrameType.EXIT)
    assert b"INT" in _out(frames, P.FrameType.STDOUT) and P.decode_exit(frames[-1]).code == 7
    a.close()


def _children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed")
def test_agent_a_stalled_session_holds_up_no_other(agent_bin, tmp_path):
    """A PUT whose tar is stopped (as FREEZE stops it) stops reading its frames; the agent keeps
    them for it and serves the other sessions meanwhile."""
    import signal

    a = Agent(agent_bin, {"TL_TAR": "/bin/busybox"})
    s = Sessions(a)
    s.send(1, P.encode_put(str(tmp_path) + "/", "big"))
    assert s.until(1, P.FrameType.PATH, P.FrameType.ERROR)[-1].type is P.FrameType.PATH
    workers = _children(a.proc.pid)
    tars = [c for w in workers for c in _children(w)]
    assert len(tars) == 1
    os.kill(tars[0], signal.SIGSTOP)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("big")
        ti.size = 24 << 20
        tf.addfile(ti, io.BytesIO(b"x" * ti.size))
    data = buf.getvalue()
    for i in range(0, len(data), 1 << 19):
        s.send(1, P.encode_tar(data[i : i + (1 << 19)]))
    s.send(1, P.encode_tar(b""))
    t0 = time.monotonic()
    frames = s.reply(2, P.encode_exec(P.ExecMsg(("echo", "served"), SH, "root", "/")))
    assert frames.type is P.FrameType.EXIT and time.monotonic() - t0 < 10
    os.kill(tars[0], signal.SIGCONT)
    assert s.until(1, P.FrameType.OK, P.FrameType.ERROR, timeout=60)[-1].type is P.FrameType.OK
    assert (tmp_path / "big").stat().st_size == 24 << 20
    a.close()
