"""The real guest agent (runner/agent.c) against the Python codec, without a VM.

`agent --stdio` speaks the protocol on fd 0/1 and, with no MOUNT, runs steps on the host's root
(no chroot), so this checks framing, RUN streaming, exit codes, setup errors and EXPORT exactly
as the VM sees them. Needs gcc (static libc) and root (user switching, trusted xattrs, mknod).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu.provision import runner_source_dir

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent switches users: needs root"),
]


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "agent"
    p = subprocess.run(
        [
            "gcc",
            "-static",
            "-Os",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(runner_source_dir() / "agent.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0 and "cannot find -lc" in p.stderr:
        pytest.skip("static libc is missing (apt-get install libc6-dev)")
    assert p.returncode == 0, p.stderr
    return out


class Agent:
    def __init__(self, path: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(path), "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env or {}
        )
        self.reader = P.FrameReader(self.proc.stdout)

    def send(self, frame: P.Frame) -> None:
        self.proc.stdin.write(P.encode_frame(frame))
        self.proc.stdin.flush()

    def until_terminal(self) -> list[P.Frame]:
        frames = []
        while True:
            f = self.reader.read()
            frames.append(f)
            if f.type in (
                P.FrameType.OK,
                P.FrameType.ERROR,
                P.FrameType.EXIT,
                P.FrameType.EXPORT_END,
            ):
                return frames

    def close(self) -> int:
        self.send(P.encode_shutdown())
        assert self.reader.read().type is P.FrameType.OK
        self.proc.stdin.close()
        return self.proc.wait(10)


@pytest.fixture
def agent(agent_bin):
    a = Agent(agent_bin)
    assert P.decode_hello(a.reader.read()) == P.Hello(P.PROTOCOL_VERSION, "tl-agent")
    yield a
    if a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def run(agent, argv, env=("PATH=/usr/bin:/bin",), user="root", workdir="/"):
    agent.send(P.encode_run(P.RunRequestMsg(tuple(argv), tuple(env), user, workdir, False)))
    return agent.until_terminal()


def test_run_streams_stdout_stderr_and_exit_code(agent):
    frames = run(agent, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    out = b"".join(f.payload for f in frames if f.type is P.FrameType.STDOUT)
    err = b"".join(f.payload for f in frames if f.type is P.FrameType.STDERR)
    assert (out, err) == (b"out\n", b"err\n")
    assert P.decode_exit(frames[-1]) == P.Exit(7, 0)
    assert agent.close() == 0


def test_env_is_exact_and_home_follows_the_user(agent):
    frames = run(
        agent,
        ["sh", "-c", 'echo "$FOO|$HOME|$(pwd)|$(id -u)"'],
        env=("PATH=/usr/bin:/bin", "FOO=bar"),
        workdir="/tmp",
    )
    out = b"".join(f.payload for f in frames if f.type is P.FrameType.STDOUT)
    assert out == b"bar|/root|/tmp|0\n"


def test_numeric_user_runs_without_passwd_entry(agent):
    frames = run(agent, ["sh", "-c", "id -u; id -g"], user="4321")
    out = b"".join(f.payload for f in frames if f.type is P.FrameType.STDOUT)
    assert out == b"4321\n0\n"


def test_signal_exit_is_128_plus_signal(agent):
    frames = run(agent, ["sh", "-c", "kill -TERM $$"])
    assert P.decode_exit(frames[-1]) == P.Exit(128 + 15, 15)


@pytest.mark.parametrize(
    "argv, kwargs, match",
    [
        (["no-such-program-xyz"], {}, "executable file not found in \\$PATH"),
        (["true"], {"user": "no-such-user-xyz"}, "unable to find user no-such-user-xyz"),
        (["true"], {"user": "root:no-such-group-xyz"}, "unable to find group"),
        (["true"], {"workdir": "/no/such/dir"}, "workdir /no/such/dir"),
    ],
)
def test_setup_failures_are_errors_not_exits(agent, argv, kwargs, match):
    frames = run(agent, argv, **kwargs)
    assert frames[-1].type is P.FrameType.ERROR
    import re

    assert re.search(match, P.decode_error(frames[-1]))
    # the agent keeps serving after an error
    assert P.decode_exit(run(agent, ["true"])[-1]).code == 0


def test_unknown_request_and_idle_kill(agent):
    agent.send(P.Frame(P.FrameType.HELLO))
    f = agent.reader.read()
    assert f.type is P.FrameType.ERROR and "unknown request type 0x01" in P.decode_error(f)
    # An idle KILL gets no reply: the next frame answers the next request.
    agent.send(P.encode_kill(9))
    agent.send(P.Frame(P.FrameType.HELLO))
    f = agent.reader.read()
    assert f.type is P.FrameType.ERROR and "unknown request type 0x01" in P.decode_error(f)


def test_kill_during_a_step(agent):
    agent.send(
        P.encode_run(
            P.RunRequestMsg(
                ("sh", "-c", "echo started; sleep 30"), ("PATH=/usr/bin:/bin",), "root", "/", False
            )
        )
    )
    first = agent.reader.read()
    assert first.payload == b"started\n"
    agent.send(P.encode_kill(9))
    frames = agent.until_terminal()
    assert P.decode_exit(frames[-1]).signal == 9


def test_export_sends_tar_whiteouts_opaque_and_xattrs(agent_bin, tmp_path):
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "opq").mkdir()
    (upper / "new.txt").write_text("hello")
    os.mknod(upper / "etc" / "gone", stat.S_IFCHR, 0)
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "new.txt", "user.note", b"a\0b")
    os.setxattr(upper / "new.txt", "trusted.overlay.origin", b"ignored")

    a = Agent(agent_bin, env={"TL_TAR": busybox})
    P.decode_hello(a.reader.read())
    a.send(P.encode_export(str(upper)))
    frames = a.until_terminal()
    end = P.decode_export_end(frames[-1])
    assert end.opaque == ("opq",)
    assert end.xattrs == (("new.txt", "user.note", b"a\0b"),)
    data = b"".join(f.payload for f in frames if f.type is P.FrameType.TAR)
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert members["./etc/gone"].ischr()
    assert (members["./etc/gone"].devmajor, members["./etc/gone"].devminor) == (0, 0)
    assert members["./new.txt"].size == 5
    assert members["./opq"].isdir()
    assert a.close() == 0
