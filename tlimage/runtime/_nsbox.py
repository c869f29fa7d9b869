"""PID 1 of a namespace sandbox (started by runtime/namespace.py under `unshare`, as
`python3 -I -S _nsbox.py SPEC.json`).

Standalone: it imports only the standard library and the executor's `_nsinit` helpers (user
resolution and mounts), so it starts in ~20 ms and keeps running if tlimage is upgraded.

Contract with the host:
- It joins the sandbox's cgroups, mounts the overlay root (image layers + the sandbox's own
  upper) and /proc, /sys, /dev inside its private mount namespace, and starts the entrypoint,
  if any, chrooted into that root.
- On the SOCK_SEQPACKET socket `sock_fd` it sends `ready` (or `error: ...`) with its
  credentials, which the kernel translates to its host pid. It then waits for `go`: a host that
  dies before recording the sandbox never sends it, and the sandbox ends rather than leak.
- It never chroots itself: `nsenter -t <pid> -m` lands in a mount namespace that still holds
  the host's files (the exec helper, python) plus the sandbox root at `merged`.
- It ends the sandbox on SIGTERM, when the entrypoint exits, or when the wall-clock deadline in
  `deadline_file` passes (re-read on every wake-up, so the host may move it later; an empty file
  means no deadline). Before ending it writes `exit_file` (JSON: reason, exit_code, at). As PID
  1, its exit takes every process of the sandbox with it, and the mounts go with the namespace.
"""

import json
import os
import signal
import socket
import struct
import sys
import time

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def write_atomic(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        import fcntl

        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def setup(spec, ns):
    """The sandbox's root at spec["merged"]; returns the placeholder files it created in the
    upper (a snapshot leaves them out)."""
    root = spec["merged"]
    ns.mount(None, "/", flags="rec,private")
    lowers = ":".join(reversed(spec["lowers"]))  # overlayfs wants the top layer first
    ns.mount("overlay", root, "overlay",
             f"lowerdir={lowers},upperdir={spec['upper']},workdir={spec['work']},"
             "redirect_dir=off,metacopy=off,index=off")
    if os.path.isdir(root + "/proc"):
        ns.mount("proc", root + "/proc", "proc", flags="nosuid,nodev,noexec")
    if os.path.isdir(root + "/sys"):
        try:
            ns.mount("sysfs", root + "/sys", "sysfs", flags="nosuid,nodev,noexec,ro")
        except OSError:
            ns.mount("/sys", root + "/sys", flags="bind,rec")
    if os.path.isdir(root + "/dev"):
        dev = root + "/dev"
        ns.mount("tmpfs", dev, "tmpfs", "mode=755,size=65536k", flags="nosuid")
        for node in ("null", "zero", "full", "random", "urandom", "tty"):
            os.close(os.open(f"{dev}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
            ns.mount(f"/dev/{node}", f"{dev}/{node}", flags="bind")
        for d in ("pts", "shm", "mqueue"):
            os.mkdir(f"{dev}/{d}")
        ns.mount("devpts", f"{dev}/pts", "devpts", "newinstance,ptmxmode=0666,mode=620",
                 flags="nosuid,noexec")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        ns.mount("tmpfs", f"{dev}/shm", "tmpfs", "mode=1777", flags="nosuid,nodev")
        try:
            ns.mount("mqueue", f"{dev}/mqueue", "mqueue", flags="nosuid,nodev,noexec")
        except OSError:
            os.rmdir(f"{dev}/mqueue")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{dev}/{name}")
    created, mounted = [], []
    if spec["network"]:
        ns.bind_file(root, "/etc/resolv.conf", "/etc/resolv.conf", created, mounted)
        ns.bind_file(root, "/etc/hosts", "/etc/hosts", created, mounted)
    else:
        loopback_up()
    socket.sethostname(spec["hostname"])
    return [os.path.relpath(p, root) for p in created]


def start_entrypoint(spec, ns):
    """Forks the entrypoint chrooted into the sandbox; returns its pid once it has exec'd, or
    raises with the reason it could not start."""
    ep = spec["entrypoint"]
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        ns.STATUS_FD = w
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        os.setsid()
        try:
            os.chroot(spec["merged"])
            os.chdir("/")
        except OSError as e:
            ns.fail(f"chroot: {e.strerror}")
        uid, gid, groups, home = ns.resolve_user(ep["user"])
        try:
            os.chdir(ep["workdir"] or "/")
        except OSError as e:
            ns.fail(f"workdir {ep['workdir']}: {e.strerror}")
        env = dict(e.split("=", 1) for e in ep["env"])
        exe = ns.find_exec(ep["argv"][0], env.get("PATH", "/usr/bin:/bin"))
        if exe is None:
            ns.fail(f'exec: "{ep["argv"][0]}": executable file not found in $PATH')
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            ns.fail(f"set user {ep['user']}: {e.strerror}")
        env.setdefault("HOME", home)
        try:
            os.execve(exe, ep["argv"], env)
        except OSError as e:
            ns.fail(f"exec {ep['argv'][0]}: {e.strerror}")
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    msg = b"".join(chunks).decode("utf-8", "replace")
    if msg:
        os.waitpid(pid, 0)
        raise RuntimeError(f"the entrypoint could not start: {msg}")
    return pid


def send(sock, text):
    creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
    sock.sendmsg([text.encode("utf-8", "replace")],
                 [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])


def read_deadline(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return float(text) if text else None
    except (OSError, ValueError):
        return None


def finish(spec, reason, code):
    write_atomic(spec["exit_file"],
                 json.dumps({"reason": reason, "exit_code": code, "at": time.time()}))
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.005)
    os._exit(0)


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sys.path.insert(0, spec["nsinit_dir"])
    import _nsinit as ns  # noqa: PLC0415 - found through the spec, not sys.path

    sock = socket.socket(fileno=spec["sock_fd"])
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        for procs in spec["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write("0")
        placeholders = setup(spec, ns)
        write_atomic(spec["placeholders_file"], json.dumps(placeholders))
        entry = start_entrypoint(spec, ns) if spec["entrypoint"] else None
    except (OSError, RuntimeError, SystemExit) as e:
        send(sock, f"error: {e}")
        os._exit(1)
    send(sock, "ready")
    sock.settimeout(60)
    try:
        go = sock.recv(16)
    except OSError:
        go = b""
    sock.close()
    if go != b"go":
        finish(spec, "the host did not confirm the start", None)

    while True:
        deadline = read_deadline(spec["deadline_file"])
        if deadline is not None and time.time() >= deadline:
            finish(spec, "timeout", None)
        wait = 3600.0 if deadline is None else min(3600.0, max(0.0, deadline - time.time()))
        info = signal.sigtimedwait(SIGNALS, wait)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == entry:
                code = os.waitstatus_to_exitcode(status)
                finish(spec, "entrypoint exited", 128 - code if code < 0 else code)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            finish(spec, "terminated", None)


if __name__ == "__main__":
    main()
