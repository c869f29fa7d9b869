"""The spawner: a small helper process on the host that has imported `_init` (and ctypes,
json, socket) once and forks the launcher of every build step and sandbox from there, so
neither a Python start (~30 ms of interpreter and imports) nor a fork of the large calling
process (with a pre-exec hook, so no vfork) is paid per sandbox. Started by
sandbox/spawner.py as `tlimage-spawn -I -S /dev/fd/B S`, like `_init`; stdlib only.

It reads requests on the SOCK_SEQPACKET socket `ctl_fd`; one request is one message: JSON
`{"module", "unshare", "cgroup_procs", "die_with_parent", "new_session", "targets"}` with
descriptors (SCM_RIGHTS): a reply socket, the pipe the spec arrives on, then one per entry of
`targets` (the descriptor number it must have in the child: 0-2 are stdin/out/err, the others
the `pass_fds` the spec names). It forks; the child places the descriptors (closing every
other one), starts a session, asks for SIGKILL when this process dies, joins the cgroups,
unshares the namespaces, reads the spec and runs `module.main(spec)` as the former
`tlimage-init` did. On the reply socket the caller hears `{"pid"}` at once and `{"status"}`
(a wait status as an exit code, negative for a signal) once the child is reaped; a failure
before the fork is `{"error"}` (and nothing else), one of the child before `main` is
`{"failed"}` (which may come before `{"pid"}`). This process ends when the caller's end of
`ctl_fd` closes (the caller exited), and every launcher of a build step dies with it.
"""

import ctypes
import json
import os
import select
import signal
import socket
import sys

import _init

MAX_FDS = 64


def place(fds, targets):
    """Gives descriptor fds[i] the number targets[i] (all distinct) and closes every other
    descriptor but 0-2."""
    top = max([*targets, *fds, 2]) + 1
    high = [os.dup2(fd, top + i, inheritable=True) for i, fd in enumerate(fds)]
    for fd in fds:
        if fd not in high:
            os.close(fd)
    for h, t in zip(high, targets, strict=True):
        os.dup2(h, t, inheritable=True)
    for h in high:
        if h not in targets:
            os.close(h)
    keep = sorted(set(targets) | {0, 1, 2})
    fd = 0
    for k in keep:
        if k > fd:
            os.closerange(fd, k)
        fd = k + 1
    os.closerange(fd, 1 << 16)


def child(req, fds, parent, sockets):
    """In the forked child: becomes the launcher the request asks for. Never returns. `fds`:
    the reply socket, the spec pipe, then one per target; `sockets`: this process's socket
    objects, let go of without closing (their numbers are reused here)."""
    for s in sockets:
        s.detach()
    reply_fd = -1
    try:
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        targets = req["targets"]
        top = max([*targets, *fds, 2]) + 1
        reply_fd, spec_fd = top + len(fds), top + len(fds) + 1
        os.dup2(fds[0], reply_fd, inheritable=False)
        os.dup2(fds[1], spec_fd, inheritable=False)
        place(fds[2:] + [reply_fd, spec_fd], targets + [reply_fd, spec_fd])
        if req.get("new_session"):
            os.setsid()
        if req.get("die_with_parent"):
            _init.prctl(_init.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(137)
        for f in req.get("cgroup_procs", []):
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if req.get("unshare") and _init.libc().unshare(req["unshare"]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare: {os.strerror(err)}")
        chunks = []
        while True:
            b = os.read(spec_fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        os.close(spec_fd)
        spec = json.loads(b"".join(chunks))
        module = __import__(req["module"])
    except BaseException as e:  # noqa: BLE001 - told to the caller, which raises it
        try:
            os.write(reply_fd, json.dumps({"failed": str(e)}).encode())
        finally:
            os._exit(127)
    os.close(reply_fd)
    module.main(spec)
    os._exit(127)


def reply(sock, obj):
    try:
        sock.send(json.dumps(obj).encode())
    except OSError:
        pass  # the caller is gone


def serve(ctl):
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    waiting = {}  # pid -> reply socket
    while True:
        ready, _, _ = select.select([ctl, wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            while waiting:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                sock = waiting.pop(pid, None)
                if sock is not None:
                    reply(sock, {"status": os.waitstatus_to_exitcode(status)})
                    sock.close()
        if ctl in ready:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, MAX_FDS)
            except InterruptedError:
                continue
            if not msg:
                return  # the caller exited
            sock = socket.socket(fileno=fds[0]) if fds else None
            try:
                req = json.loads(msg)
                if len(fds) != 2 + len(req["targets"]):
                    raise ValueError(f"{len(fds)} descriptors for {len(req['targets'])} targets")
                pid = os.fork()
            except Exception as e:  # noqa: BLE001 - a bad request or no memory: said, not fatal
                for fd in fds[1:]:
                    os.close(fd)
                if sock is not None:
                    reply(sock, {"error": str(e)})
                    sock.close()
                continue
            if pid == 0:
                child(req, fds, me, [ctl, *waiting.values(), *([sock] if sock else [])])
            for fd in fds[1:]:
                os.close(fd)
            waiting[pid] = sock
            reply(sock, {"pid": pid})


def main(spec):
    ctl = socket.socket(fileno=spec["ctl_fd"])
    os.set_inheritable(ctl.fileno(), False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the caller, which decides
    try:
        serve(ctl)
    finally:
        sys.stdout.flush()
    os._exit(0)
