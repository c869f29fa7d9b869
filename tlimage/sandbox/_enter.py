"""Starts a process in a running namespace sandbox (sandbox/namespace.py `enter`): this
module and `_init` are imported on the host, then it joins the sandbox's cgroups and
namespaces with setns (PID 1's mount namespace has the sandbox's root as `/`, so no chroot and
no host path) and forks, since only children join a PID namespace. The parent stays outside,
waits, and exits with the child's code; the child dies with it.

Modes:
    exec  become the user, cd, exec argv with exactly `env` (podman's default capabilities,
          no_new_privs, the seccomp filter: see _init.become)
    fs    one file operation (stat, list, mkdir, remove), the result as JSON on stdout
    put   read a tar on stdin whose single top-level entry is `_`, and write it as `dest`
          (or `dest/<name>` when `dest` is a directory), owners as in the tar
    get   write `src` as a tar with the single top-level entry `_` on stdout (a symlink is
          copied as the link, as `docker cp` does)

Everything that can fail before the program runs is written to `status_fd` (closed on exec)
and ends with exit 127, so the host tells "could not start" from an exit code.
"""

import fcntl
import json
import os
import shutil
import signal
import socket
import stat as S
import struct
import sys
import tarfile
import termios

import _init as ns

# user first: the others belong to it; mnt last: it leaves the host
NAMESPACES = ("user", "cgroup", "ipc", "uts", "net", "pid", "mnt")


def join(init):
    """Joins the namespaces of the process `init` ([host pid, start time]); in its user
    namespace (when it has one of its own) as that namespace's root."""
    pid, started = init
    fds = []
    try:
        for name in NAMESPACES:
            fds.append(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        if int(raw[raw.rfind(b")") + 2 :].split()[19]) != started:
            raise OSError(3, "the sandbox's init process is gone")
    except OSError as e:
        ns.fail(f"the sandbox is not running: {e.strerror or e}")
    for name, fd in zip(NAMESPACES, fds, strict=True):
        if name == "user":
            if os.fstat(fd).st_ino != os.stat("/proc/self/ns/user").st_ino:
                try:
                    ns.join_userns(fd)
                except OSError as e:
                    ns.fail(f"cannot join the sandbox (user): {e.strerror or e}")
        elif ns.libc().setns(fd, 0) != 0:
            err = ns.ctypes.get_errno()
            ns.fail(f"cannot join the sandbox ({name}): {os.strerror(err)}")
        os.close(fd)


def main(spec):
    ns.STATUS_FD = spec["status_fd"]
    os.set_inheritable(ns.STATUS_FD, False)
    ns.start(spec)
    for procs in spec["cgroup_procs"]:
        try:
            with open(procs, "w") as f:
                f.write("0")
        except OSError:
            pass  # the sandbox is ending; joining its namespaces fails if it is gone
    join(spec["init"])
    pid = os.fork()
    if pid:
        os.close(ns.STATUS_FD)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir("/")
    mode = spec["mode"]
    if mode == "exec":
        run(spec)
    if mode not in ("put", "get", "fs"):
        ns.fail(f"unknown mode {mode!r}")
    try:  # the copy runs as root, but with no more privilege than a step's root
        ns.drop_bounding()
        ns.prctl(ns.PR_SET_NO_NEW_PRIVS, 1)
        ns.set_caps(0)
        ns.close_fds((ns.STATUS_FD,))
        ns.load_seccomp(ns.SECCOMP)
    except OSError as e:
        ns.fail(f"drop privileges: {e.strerror or e}")
    {"put": put, "get": get, "fs": fs}[mode](spec)
    os._exit(0)


def run(spec):
    if spec.get("tty"):
        _tty(spec)
    ns.become({**spec, "pdeathsig": True})


def _tty(spec):
    """A pseudo-terminal of the sandbox's own devpts becomes the program's controlling
    terminal and its stdin, stdout and stderr; the master goes to the host over the socket
    `tty_sock_fd` (SCM_RIGHTS), which relays it to the user's terminal."""
    tiocsptlck, tiocgptn = 0x40045431, 0x80045430  # <asm-generic/ioctls.h>
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
        fcntl.ioctl(master, tiocsptlck, struct.pack("i", 0))
        n = struct.unpack("I", fcntl.ioctl(master, tiocgptn, b"\0" * 4))[0]
        slave = os.open(f"/dev/pts/{n}", os.O_RDWR | os.O_NOCTTY)
        rows, cols = spec.get("winsize") or (24, 80)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        uid = ns.resolve_user(spec["user"])[0]
        os.fchown(slave, uid, -1)
        sock = socket.socket(fileno=spec["tty_sock_fd"])
        socket.send_fds(sock, [b"pty"], [master])
        sock.close()
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
    except OSError as e:
        ns.fail(f"cannot set up a terminal in the sandbox: {e.strerror or e}")


def _target(dest, name):
    if os.path.isdir(dest):
        return os.path.join(dest, name)
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        ns.fail(f"{parent}: no such directory in the sandbox")
    if dest.endswith("/"):
        ns.fail(f"{dest}: no such directory in the sandbox")
    return dest.rstrip("/")


def put(spec):
    target = _target(spec["dest"], spec["name"])
    base = os.path.basename(target) or "."
    os.chdir(os.path.dirname(target) or "/")
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
        for m in tf:
            if m.name != "_" and not m.name.startswith("_/"):
                ns.fail(f"unexpected entry {m.name!r} in the copied archive")
            m.name = base + m.name[1:]
            if m.islnk():
                m.linkname = base + m.linkname[1:]
            if m.isdir() and os.path.isdir(m.name):
                os.chmod(m.name, m.mode & 0o7777)
                continue
            tf.extract(m, ".", numeric_owner=True, filter="fully_trusted")
    sys.stdout.write(json.dumps({"path": target}))
    sys.stdout.flush()
    os.close(ns.STATUS_FD)


def get(spec):
    src = spec["src"]
    try:
        os.lstat(src)
    except OSError as e:
        ns.fail(f"{src}: {e.strerror}")
    os.close(ns.STATUS_FD)
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname="_", recursive=True)
    sys.stdout.flush()


def _entry(path, name=None, follow=False):
    st = os.stat(path) if follow else os.lstat(path)
    kind = ("dir" if S.S_ISDIR(st.st_mode) else "file" if S.S_ISREG(st.st_mode)
            else "symlink" if S.S_ISLNK(st.st_mode) else "fifo" if S.S_ISFIFO(st.st_mode)
            else "socket" if S.S_ISSOCK(st.st_mode) else "char" if S.S_ISCHR(st.st_mode)
            else "block")  # fmt: skip
    return {"name": name if name is not None else (os.path.basename(path) or "/"),
            "path": path, "type": kind, "size": st.st_size, "mode": st.st_mode & 0o7777,
            "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime,
            "link_target": os.readlink(path) if kind == "symlink" else None}  # fmt: skip


def fs(spec):
    """One file operation in the sandbox's root (a link resolves inside it, as for cp); the
    result is JSON on stdout, a failure goes to the status fd."""
    op, path = spec["op"], spec["path"]
    try:
        if op == "stat":
            try:
                out = _entry(path, follow=spec.get("follow", False))
                if spec.get("follow"):
                    out["path"] = os.path.realpath(path)  # inside the root: pivot_root
            except FileNotFoundError:
                if not spec.get("missing_ok"):
                    raise
                out = None
        elif op == "list":
            if not os.path.isdir(path):
                ns.fail(f"{path}: not a directory")
            out = []
            for name in sorted(os.listdir(path)):
                try:
                    out.append(_entry(os.path.join(path, name), name))
                except FileNotFoundError:
                    continue  # removed while listing
        elif op == "mkdir":
            if spec.get("parents"):
                os.makedirs(path, mode=spec.get("perm", 0o755), exist_ok=True)
            else:
                os.mkdir(path, spec.get("perm", 0o755))
            out = _entry(path)
        elif op == "remove":
            if os.path.isdir(path) and not os.path.islink(path):
                if spec.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
            out = {"path": path}
        else:
            ns.fail(f"unknown file operation {op!r}")
    except OSError as e:
        ns.fail(f"{path}: {e.strerror}")
    os.close(ns.STATUS_FD)
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
