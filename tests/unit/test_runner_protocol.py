"""Pins runner/PROTOCOL.md (version 3): golden bytes, round trips, rejection rules, and the real
agent (compiled here, run in `--stdio` mode) answering the version 2 sandbox requests and the
version 3 RUN mount requests."""

from __future__ import annotations

import io
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


def test_version_is_three():
    assert P.PROTOCOL_VERSION == 3


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
    assert wire == bytes.fromhex("01000000 0000000e 0003 00000008") + b"tl-agent"


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
    with pytest.raises(P.ProtocolError, match="version 1; this host speaks 3") as e:
        P.decode_hello(P.encode_hello(version=1))
    assert "stale" in (e.value.hint or "")


def test_first_frame_must_be_hello():
    with pytest.raises(P.ProtocolError, match="expected HELLO"):
        P.decode_hello(P.Frame(P.FrameType.OK))


@pytest.mark.parametrize(
    "header, match",
    [
        (struct.pack(">BBHI", 0x7F, 0, 0, 0), "unknown frame type 0x7f"),
        (struct.pack(">BBHI", 0x02, 1, 0, 0), "reserved"),
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


class Agent:
    def __init__(self, binary: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(binary), "--stdio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
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
    assert P.decode_hello(a.reader.read()).version == 3
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
