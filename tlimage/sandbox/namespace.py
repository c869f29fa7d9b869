"""The host side of namespace isolation, shared by build steps and long-lived sandboxes.

    unshare --mount --pid --fork --uts --ipc [--net] --kill-child=SIGKILL -- \\
        python3 -I -S _init.py FD          PID 1 inside; its spec arrives on the pipe FD
    nsenter -t <init> -m -u -i -p [-n] -- python3 -I -S _enter.py SPEC   exec, cp in, cp out

`run_step` runs one build step to its end (PID 1 exits with the step's code); `start_box`
starts a sandbox that outlives this process (`setsid -f` makes it nobody's child) and returns
once its PID 1 said it is ready; `enter_command` is how a process joins a running one.

All mounts live in the sandbox's private mount namespace, so they disappear with its last
process; killing `unshare` (on timeout, Ctrl-C or a crash of this process) kills the sandbox's
PID 1 and with it every process of the sandbox.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT = HERE / "_init.py"
ENTER = HERE / "_enter.py"
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1

Output = Callable[[str, bytes], None]


class SandboxError(Exception):
    """The sandbox could not be started or entered; the message says why (callers wrap it in
    their own error class)."""


def check_host() -> str | None:
    """None when this host can run namespace sandboxes, else the reason it cannot."""
    if os.geteuid() != 0:
        return "namespace isolation needs root (it mounts overlayfs and makes namespaces)"
    for t in ("unshare", "nsenter", "setsid"):
        if shutil.which(t, path=TOOL_PATH) is None:
            return f"`{t}` is not installed (apt-get install util-linux)"
    return None


def tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise SandboxError(f"`{name}` is not installed (apt-get install -y util-linux)")
    return path


def root_spec(lowers: list[Path] | tuple[Path, ...], upper: Path, work: Path, merged: Path,
              *, network: bool, hostname: str) -> dict:  # fmt: skip
    """The part of an init spec that describes the sandbox's root and namespaces."""
    return {
        "lowers": [str(p.resolve()) for p in lowers],
        "upper": str(upper.resolve()),
        "work": str(work.resolve()),
        "merged": str(merged.resolve()),
        "network": network,
        "hostname": hostname,
    }


def _unshare_argv(spec: dict, spec_fd: int) -> list[str]:
    flags = ["--mount", "--pid", "--fork", "--uts", "--ipc", "--kill-child=SIGKILL"]
    if not spec["network"]:
        flags.append("--net")
    return [tool("unshare"), *flags, "--", sys.executable, "-I", "-S", str(INIT), str(spec_fd)]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _write_all(fd: int, data: bytes) -> None:
    """Writes and closes; a sandbox that died first (EPIPE) reports its own failure."""
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def read_all(fd: int) -> str:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks).decode("utf-8", "replace")


# --- one build step ------------------------------------------------------------------------


def run_step(spec: dict, *, secrets: bytes, emit: Output, timeout: float | None,
             on_timeout: Callable[[], BaseException]) -> int:  # fmt: skip
    """Runs the step `spec` describes (see _init.main_step) and returns its exit code (128+N
    for signal N). Output goes to `emit` as it comes; past `timeout` seconds the sandbox is
    killed and `on_timeout()` raised. A failure before the step's exec raises SandboxError."""
    status_r, status_w = os.pipe()
    spec_r, spec_w = os.pipe()
    secrets_r, secrets_w = os.pipe() if spec.get("mounts") else (-1, -1)
    spec = {**spec, "mode": "step", "status_fd": status_w, "secrets_fd": secrets_r}
    fds = [status_w, spec_r] + ([secrets_r] if secrets_r >= 0 else [])
    try:
        proc = subprocess.Popen(
            _unshare_argv(spec, spec_r),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={"PATH": TOOL_PATH},
        )
    except BaseException:
        for fd in (status_r, status_w, spec_r, spec_w, secrets_r, secrets_w):
            if fd >= 0:
                os.close(fd)
        raise
    for fd in fds:
        os.close(fd)
    _write_all(spec_w, json.dumps(spec).encode())
    if secrets_w >= 0:
        _write_all(secrets_w, secrets)
    deadline = None if timeout is None else time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while sel.get_map():
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(wait)
            if not events and deadline is not None and time.monotonic() >= deadline:
                raise on_timeout()
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if data:
                    emit(key.data, data)
                else:
                    sel.unregister(key.fileobj)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            proc.wait(left)
        except subprocess.TimeoutExpired:
            raise on_timeout() from None
        failure = read_all(status_r)
    except BaseException:
        _kill(proc)
        raise
    finally:
        sel.close()
        os.close(status_r)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    if failure:
        raise SandboxError(failure)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to unshare's process group; --kill-child takes the sandbox's PID 1 (and with it
    the whole PID namespace) down too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- a long-lived sandbox ------------------------------------------------------------------


def start_box(spec: dict, log: Path, timeout: float) -> tuple[int, Callable[[], None]]:
    """Starts the sandbox `spec` describes (see _init.main_box) detached from this process;
    returns (host pid of its PID 1, confirm). The sandbox waits (up to a minute) for
    `confirm()` and ends itself without it, so a caller that dies between start and recording
    the pid leaks nothing. Raises SandboxError with the sandbox's reason when it failed."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spec_r, spec_w = os.pipe()
    try:
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        spec = {**spec, "mode": "box", "sock_fd": child.fileno()}
        cmd = [tool("setsid"), "-f", *_unshare_argv(spec, spec_r)]
        with open(log, "ab") as out:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           pass_fds=(child.fileno(), spec_r), env={"PATH": TOOL_PATH},
                           check=True)  # fmt: skip
        os.close(spec_r)
        spec_r = -1
        child.close()
        _write_all(spec_w, json.dumps(spec).encode())
        spec_w = -1
        parent.settimeout(timeout)
        try:
            msg, anc, _flags, _addr = parent.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            msg, anc = b"", []
        pid = None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", data[:12])[0]
        text = msg.decode("utf-8", "replace")
        if text != "ready" or pid is None:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise SandboxError(text.removeprefix("error: ") if text else _log_tail(log))
    except BaseException:
        for fd in (spec_r, spec_w):
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(OSError):
            child.close()
        parent.close()
        raise

    def confirm() -> None:
        try:
            parent.send(b"go")
        finally:
            parent.close()

    return pid, confirm


def _log_tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").strip().splitlines()
        if lines:
            return "\n".join("  | " + line for line in lines[-10:])
    return "the sandbox process exited without saying why"


def enter_command(init_pid: int, network: bool, spec_fd: int) -> list[str]:
    """The command that runs `_enter.py` inside the sandbox whose PID 1 is `init_pid`; it
    reads its spec (see _enter.main) from the pipe `spec_fd` (made by `spec_pipe`, passed to
    the command), so nothing of it — an exec's environment and secrets included — is on a
    command line."""
    ns_flags = ["-m", "-u", "-i", "-p"] + ([] if network else ["-n"])
    return [tool("nsenter"), "-t", str(init_pid), *ns_flags, "--",
            sys.executable, "-I", "-S", str(ENTER), f"fd:{spec_fd}"]  # fmt: skip


def spec_pipe(spec: dict) -> int:
    """The read end of a pipe that holds `spec` as JSON and then EOF (a writer thread feeds
    what does not fit in the pipe's buffer). The caller passes it on and closes it."""
    import threading

    data = json.dumps(spec).encode()
    r, w = os.pipe()
    if len(data) <= 60000:
        _write_all(w, data)
        return r

    def feed() -> None:
        with contextlib.suppress(OSError):
            _write_all(w, data)

    threading.Thread(target=feed, daemon=True).start()
    return r
