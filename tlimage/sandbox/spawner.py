"""The host side of the spawner (`_spawn.py`): one helper process per calling process,
started on first use, that forks the launcher of every build step and sandbox (`_init.main`
in new namespaces) instead of a fresh Python per sandbox started by a fork of this (large)
process. `launch` returns a `Launched`, the part of `subprocess.Popen` the launcher's callers
use (pid, stdout/stderr pipes, wait, returncode).

The helper runs as this process's child with `PATH` as its only variable, stdin/stdout/stderr
on /dev/null, no namespace of its own, and ends when this process's end of its socket closes
(this process exited); a forked child of this process starts its own. A helper that died is
started again on the next launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from typing import IO

REPLY_SIZE = 4096


class SpawnError(Exception):
    """The spawner could not start the launcher; the message says why."""


class Launched:
    """A launcher forked by the spawner (its child, so its status comes from there)."""

    def __init__(self, pid: int, reply: socket.socket, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None) -> None:  # fmt: skip
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.error = ""  # why the launcher failed before the sandbox's own code ran
        self._reply = reply
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (negative: killed by that signal); raises subprocess.TimeoutExpired
        after `timeout` seconds."""
        with self._lock:
            while self.returncode is None:
                self._reply.settimeout(timeout)
                try:
                    msg = self._reply.recv(REPLY_SIZE)
                except TimeoutError:
                    raise subprocess.TimeoutExpired(f"sandbox launcher {self.pid}",
                                                    timeout or 0) from None  # fmt: skip
                if not msg:  # the spawner died, and with it this launcher (its parent)
                    self.returncode = -9
                    break
                obj = json.loads(msg)
                if "failed" in obj:
                    self.error = str(obj["failed"])
                if "status" in obj:
                    self.returncode = int(obj["status"])
            self._reply.close()
            return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None


class _Spawner:
    def __init__(self) -> None:
        from tlimage.sandbox import namespace  # it starts Python programs from this folder

        self.owner = os.getpid()
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = namespace._launch(  # noqa: SLF001 - the same package
                "_spawn", {"ctl_fd": theirs.fileno()}, pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        except BaseException:
            self.ctl.close()
            raise
        finally:
            theirs.close()

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        self.ctl.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


_lock = threading.Lock()
_current: _Spawner | None = None


def _spawner(fresh: bool = False) -> _Spawner:
    global _current
    with _lock:
        if _current is not None and (fresh or not _current.alive()):
            if _current.owner == os.getpid():
                _current.close()
            _current = None
        if _current is None:
            _current = _Spawner()
        return _current


def _fd(what: object, default: int, mine: list[int], theirs: list[int]) -> tuple[int, int]:
    """(the descriptor to send, our read end or -1) for a Popen-style stdin/out/err value."""
    if what is None:
        return default, -1
    if what == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        theirs.append(fd)
        return fd, -1
    if what == subprocess.PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        mine.append(r)
        theirs.append(w)
        return w, r
    if isinstance(what, int):
        return what, -1
    return what.fileno(), -1  # type: ignore[attr-defined]


def launch(module: str, spec: bytes, *, unshare: int = 0, cgroup_procs: list[str] = (),
           die_with_parent: bool = False, pass_fds: tuple[int, ...] = (),
           stdin: object = None, stdout: object = None, stderr: object = None,
           start_new_session: bool = False) -> Launched:  # fmt: skip
    """Forks `module.main(spec)` (`spec`: its JSON) from the spawner: with the given stdio
    (None, DEVNULL, PIPE, a descriptor or a file) and `pass_fds` at the same numbers, in a
    session of its own, dying with the spawner, in `cgroup_procs` and then in new namespaces
    (`unshare` flags). Raises SpawnError when it could not be forked."""
    for attempt in (0, 1):
        mine: list[int] = []
        theirs: list[int] = []
        reply, reply_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
        theirs += [reply_theirs.detach(), spec_r]
        try:
            fd_in, _ = _fd(stdin, 0, mine, theirs)
            fd_out, r_out = _fd(stdout, 1, mine, theirs)
            fd_err, r_err = _fd(stderr, 2, mine, theirs)
            req = {"module": module, "unshare": unshare, "cgroup_procs": list(cgroup_procs),
                   "die_with_parent": die_with_parent, "new_session": start_new_session,
                   "targets": [0, 1, 2, *pass_fds]}  # fmt: skip
            fds = [theirs[0], spec_r, fd_in, fd_out, fd_err, *pass_fds]
            sp = _spawner(fresh=attempt > 0)
            failed = None  # the child's own failure may come before the spawner's pid
            try:
                socket.send_fds(sp.ctl, [json.dumps(req).encode()], fds)
                msg = reply.recv(REPLY_SIZE)
                while msg and "failed" in (obj := json.loads(msg)):
                    failed = str(obj["failed"])
                    msg = reply.recv(REPLY_SIZE)
            except OSError:
                msg = b""
        except BaseException:
            reply.close()
            for fd in (*mine, spec_w):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        obj = json.loads(msg) if msg else {}
        if "pid" in obj:
            write_and_close(spec_w, spec)
            out = open(r_out, "rb", buffering=0) if r_out >= 0 else None  # noqa: SIM115
            err = open(r_err, "rb", buffering=0) if r_err >= 0 else None  # noqa: SIM115
            launched = Launched(int(obj["pid"]), reply, out, err)
            launched.error = failed or ""
            return launched
        reply.close()
        for fd in (*mine, spec_w):
            os.close(fd)
        if "error" in obj:
            raise SpawnError(str(obj["error"]))
    raise SpawnError("the sandbox spawner is not answering")


def write_and_close(fd: int, data: bytes) -> None:
    """Writes all of `data` to the pipe `fd` and closes it; a reader that died first (EPIPE:
    a launcher or sandbox that failed) reports its own failure."""
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)
