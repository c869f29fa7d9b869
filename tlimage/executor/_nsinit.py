"""PID 1 of a namespace build sandbox (run by namespace.py under `unshare`, as `python3 -I -S`).

Standalone on purpose: it imports nothing from tlimage, so it starts in ~15 ms. It receives one
JSON spec in argv[1], mounts the overlay and the pseudo filesystems inside its private mount
namespace, forks the step (chroot, user, workdir, exec), reaps every process in the PID
namespace until the step exits, undoes its placeholder files and exits with the step's code.

Failures before the step's exec are written to the status fd (closed on exec) and end with exit 127; the
host reports them as errors rather than as step results. Semantics match runner/agent.c.
"""

import json
import os
import signal
import stat
import sys

HOSTNAME = "tlimage-build"
STATUS_FD = -1  # set from the spec: the write end of the host's status pipe


def fail(msg):
    try:
        os.write(STATUS_FD, msg.encode("utf-8", "surrogateescape"))
    finally:
        os._exit(127)


_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(src, target, fstype=None, options="", flags=""):
    import ctypes

    bits = 0
    names = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "remount": 32, "bind": 4096,
             "rec": 16384, "private": 1 << 18}
    for f in flags.split(","):
        if f:
            bits |= names[f]
    rc = libc().mount(
        src.encode() if src else None,
        target.encode(),
        fstype.encode() if fstype else None,
        bits,
        options.encode() if options else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or flags} on {target}: {os.strerror(err)}")


def resolve_user(spec):
    """Docker USER rules: returns (uid, gid, groups, home). Runs after chroot."""
    user, _, group = spec.partition(":")
    user = user or "root"
    numeric = user.isdigit()
    uid, gid, home, name = (int(user), 0, "/", None) if numeric else (None, 0, "/", None)
    try:
        with open("/etc/passwd", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fl = line.rstrip("\n").split(":")
                if len(fl) < 7:
                    continue
                if (numeric and fl[2].isdigit() and int(fl[2]) == uid) or fl[0] == user:
                    uid, gid, home, name = int(fl[2]), int(fl[3]), fl[5] or "/", fl[0]
                    break
    except OSError:
        pass
    if uid is None:
        fail(f"unable to find user {user}: no matching entries in passwd file")
    groups_file = []
    try:
        with open("/etc/group", encoding="utf-8", errors="surrogateescape") as f:
            groups_file = [line.rstrip("\n").split(":") for line in f]
    except OSError:
        pass
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for fl in groups_file:
                if len(fl) >= 3 and fl[0] == group:
                    gid = int(fl[2])
                    break
            else:
                fail(f"unable to find group {group}: no matching entries in group file")
    groups = [gid]
    if not group and name:
        for fl in groups_file:
            if len(fl) >= 4 and name in fl[3].split(",") and int(fl[2]) != gid:
                groups.append(int(fl[2]))
    return uid, gid, groups, home


def find_exec(name, path):
    if "/" in name:
        return name if os.path.lexists(name) else None
    for d in path.split(":"):
        p = os.path.join(d or ".", name)
        if os.access(p, os.X_OK):
            return p
    return None


def bind_file(root, rel, src, created, mounted):
    """See runner/agent.c step_bind_file: placeholders vanish from the upper after the step."""
    if not os.access(src, os.R_OK) or not os.path.isdir(root + "/etc"):
        return
    path = root + rel
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        created.append(path)
    mount(os.path.realpath(src), path, flags="bind")
    mounted.append(path)


def main():
    global STATUS_FD
    spec = json.loads(sys.argv[1])
    root = spec["merged"]
    STATUS_FD = spec["status_fd"]
    os.set_inheritable(STATUS_FD, False)
    try:
        mount(None, "/", flags="rec,private")
        lowers = ":".join(reversed(spec["lowers"]))  # overlayfs wants the top layer first
        mount("overlay", root, "overlay",
              f"lowerdir={lowers},upperdir={spec['upper']},workdir={spec['work']},"
              "redirect_dir=off,metacopy=off,index=off")
        mounted = []
        created = []
        if os.path.isdir(root + "/proc"):
            mount("proc", root + "/proc", "proc", flags="nosuid,nodev,noexec")
        if os.path.isdir(root + "/sys"):
            try:
                mount("sysfs", root + "/sys", "sysfs", flags="nosuid,nodev,noexec,ro")
            except OSError:
                pass
        if os.path.isdir(root + "/dev"):
            dev = root + "/dev"
            mount("tmpfs", dev, "tmpfs", "mode=755,size=65536k", flags="nosuid")
            for node in ("null", "zero", "full", "random", "urandom", "tty"):
                os.close(os.open(f"{dev}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
                mount(f"/dev/{node}", f"{dev}/{node}", flags="bind")
            for d in ("pts", "shm"):
                os.mkdir(f"{dev}/{d}")
            mount("devpts", f"{dev}/pts", "devpts", "newinstance,ptmxmode=0666,mode=620",
                  flags="nosuid,noexec")
            os.symlink("pts/ptmx", f"{dev}/ptmx")
            mount("tmpfs", f"{dev}/shm", "tmpfs", "mode=1777", flags="nosuid,nodev")
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(target, f"{dev}/{name}")
        if spec["network"]:
            bind_file(root, "/etc/resolv.conf", "/etc/resolv.conf", created, mounted)
            bind_file(root, "/etc/hosts", "/etc/hosts", created, mounted)
        try:
            import socket

            socket.sethostname(HOSTNAME)
        except OSError:
            pass
    except OSError as e:
        fail(f"sandbox setup failed: {e}")

    env = spec["env"]
    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
    pid = os.fork()
    if pid == 0:
        os.setsid()
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        try:
            os.chroot(root)
            os.chdir("/")
        except OSError as e:
            fail(f"chroot {root}: {e.strerror}")
        uid, gid, groups, home = resolve_user(spec["user"])
        try:
            os.chdir(spec["workdir"] or "/")
        except OSError as e:
            fail(f"workdir {spec['workdir']}: {e.strerror}")
        argv = spec["argv"]
        exe = find_exec(argv[0], path)
        if exe is None:
            fail(f'exec: "{argv[0]}": executable file not found in $PATH')
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            fail(f"set user {spec['user']}: {e.strerror}")
        envd = dict(e.split("=", 1) for e in env)
        envd.setdefault("HOME", home)
        try:
            os.execve(exe, argv, envd)
        except OSError as e:
            fail(f"exec {argv[0]}: {e.strerror}")
    os.close(STATUS_FD)
    # PID 1: reap everything; the step's status decides our exit code.
    code = None
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if wpid == pid:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            # Nothing the step started outlives it: from PID 1, kill(-1) reaches the whole
            # namespace (daemons in other sessions included) but not PID 1 itself.
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
    for p in reversed(mounted):
        libc().umount2(p.encode(), 2)  # MNT_DETACH
    for p in created:
        try:
            os.unlink(p)
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(code if code is not None else 127)


if __name__ == "__main__":
    main()
