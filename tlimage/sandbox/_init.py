"""PID 1 of a namespace sandbox: one build step (`mode: step`) or a long-lived sandbox
(`mode: box`). Started by sandbox/namespace.py under `unshare` as `python3 -I -S _init.py FD`;
the JSON spec arrives on the pipe FD, never in argv.

Standalone on purpose: it imports nothing from tlimage (the exec helper `_enter.py` imports it
by path), so it starts in ~15 ms and keeps running if tlimage is upgraded. It mounts the
overlay root and the pseudo filesystems inside its private mount namespace, then:

- step: makes the RUN mounts, forks the step (chroot, user, workdir, exec), reaps every process
  in the PID namespace until the step exits, undoes its placeholder files and exits with the
  step's code. Failures before the step's exec are written to `status_fd` (closed on exec) and
  end with exit 127; the host reports them as errors rather than as step results. Semantics
  match runner/agent.c. RUN mounts (`spec["mounts"]`, see executor.base.HostMount): views are
  overlays staged under `spec["scratch"]`, secrets are written to a tmpfs there (their bytes
  arrive on `spec["secrets_fd"]`), and each lands on its target by a bind mount. Missing
  targets get stubs that are removed after the step when still empty, so the upper never shows
  a mount point the step did not make.
- box: joins the sandbox's cgroups, starts the entrypoint, if any, and tells the host on the
  SOCK_SEQPACKET socket `sock_fd` `ready` (or `error: ...`) with its credentials, which the
  kernel translates to its host pid. It then waits for `go`: a host that dies before recording
  the sandbox never sends it, and the sandbox ends rather than leak. It ends the sandbox on
  SIGTERM, when the entrypoint exits, or when the wall-clock deadline in `deadline_file` passes
  (re-read on every wake-up; an empty file means no deadline), after writing `exit_file` (JSON:
  reason, exit_code, at). As PID 1, its exit takes every process of the sandbox with it.
"""

import ctypes
import json
import os
import signal
import socket
import stat
import struct
import sys
import time

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
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
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(src, target, fstype=None, options="", flags=""):
    bits = 0
    names = {
        "ro": 1,
        "nosuid": 2,
        "nodev": 4,
        "noexec": 8,
        "remount": 32,
        "bind": 4096,
        "rec": 16384,
        "private": 1 << 18,
    }
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


def _escape(path):
    """A path as one overlayfs option value (`:` separates lowers, `,` options)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay(target, options, flags="", volatile=False):
    """An overlayfs at `target`. `volatile` (a build step's upper and a RUN mount's scratch
    upper, both read by the host right after and never mounted again): the unmount at the
    end does not sync the upper's whole filesystem, which costs a disk flush per step (10-30
    ms, more when the host writes a lot); kernels before 5.10 lack the option."""
    options += ",redirect_dir=off,metacopy=off,index=off"
    if volatile:
        try:
            return mount("overlay", target, "overlay", options + ",volatile", flags)
        except OSError as e:
            if e.errno != 22:  # EINVAL: an older kernel
                raise
    mount("overlay", target, "overlay", options, flags)


def resolve_in_root(root, path, create=None, created=None):
    """The host path of `path` inside `root`, following symlinks as if `root` were `/` (so an
    image's absolute or `..` links cannot reach the host). With `create` ("dir" or "file"),
    missing components are made (folders, and the last one as `create`); each new path is
    appended to `created`, parents first. Raises OSError for a missing path without `create`."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        full = os.path.join(root, *done, name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if create is None:
                raise
            if todo or create == "dir":
                os.mkdir(full, 0o755)
            else:
                os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            created.append(full)
            done.append(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many levels of symbolic links: {path}")
            link = os.readlink(full)
            if link.startswith("/"):
                done = []
            todo = [p for p in link.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    return os.path.join(root, *done)


def read_exact(fd, n):
    chunks = []
    while n > 0:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise OSError(5, "secrets pipe closed early")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def setup_mounts(root, scratch, mounts, secrets_fd):
    """Mount `mounts` (already sorted parents first) into `root`. Returns (mounted, secret_env):
    per mount its target and the stubs made for it, and the variables to add to the step's
    environment."""
    mounted, secret_env = [], {}
    datas = [read_exact(secrets_fd, m["len"]) if m["kind"] == "secret" else None for m in mounts]
    if secrets_fd >= 0:
        os.close(secrets_fd)
    secret_dir = None
    for i, m in enumerate(mounts):
        kind, target = m["kind"], m["target"]
        if kind == "secret":
            if m["env"]:
                secret_env[m["env"]] = datas[i].decode("utf-8", "surrogateescape")
            if not target:
                continue
            if secret_dir is None:
                secret_dir = os.path.join(scratch, "secrets")
                os.mkdir(secret_dir, 0o700)
                mount("tmpfs", secret_dir, "tmpfs", "mode=700", flags="nosuid,nodev,noexec")
            src = os.path.join(secret_dir, str(i))
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, datas[i])
                os.fchown(fd, m["uid"], m["gid"])
                os.fchmod(fd, m["mode"])
            finally:
                os.close(fd)
        elif kind == "bind":
            src = m["source"]
        elif kind == "view":
            stage = os.path.join(scratch, f"m{i}")
            os.mkdir(stage)
            os.mkdir(stage + "/root")
            layers = list(m["layers"])
            opts = ""
            if m["readonly"] and len(layers) == 1:
                os.mkdir(stage + "/empty")  # overlayfs needs two lowers when it has no upper
                layers.append(stage + "/empty")
            if not m["readonly"]:
                os.mkdir(stage + "/upper")
                top = os.stat(layers[-1])  # the merged root shows the upper's owner and mode
                os.chown(stage + "/upper", top.st_uid, top.st_gid)
                os.chmod(stage + "/upper", stat.S_IMODE(top.st_mode))
                os.mkdir(stage + "/work")
                opts = f",upperdir={_escape(stage + '/upper')},workdir={_escape(stage + '/work')}"
            lowers = ":".join(_escape(p) for p in reversed(layers))
            overlay(stage + "/root", f"lowerdir={lowers}{opts}", volatile=bool(opts))
            try:
                src = resolve_in_root(stage + "/root", m["subpath"])
            except OSError as e:
                raise OSError(
                    e.errno, f"mount source {m['subpath']!r} for {target}: {e.strerror or e}"
                ) from None
        else:
            src = None
        is_dir = kind == "tmpfs" or os.path.isdir(src)
        stubs = []
        mounted.append((None, stubs))
        try:
            dest = resolve_in_root(root, target, "dir" if is_dir else "file", stubs)
        except OSError as e:
            raise OSError(e.errno, f"mount target {target}: {e.strerror or e}") from None
        try:
            if kind == "tmpfs":
                size = f",size={m['size']}" if m.get("size") else ""
                mount("tmpfs", dest, "tmpfs", f"mode=1777{size}", flags="nosuid,nodev")
            else:
                mount(src, dest, flags="bind")
            mounted[-1] = (dest, stubs)
            if kind != "tmpfs":  # a device node in a mount can never be opened
                ro = ",ro" if m["readonly"] else ""
                mount(None, dest, flags="remount,bind,nosuid,nodev" + ro)
        except OSError as e:  # name the target in the step's root, not the host path
            raise OSError(
                e.errno, f"cannot mount {kind} at {target}: {os.strerror(e.errno or 5)}"
            ) from None
    return mounted, secret_env


def undo_mounts(mounted):
    """Unmount, innermost first; a mount's stubs go right after it, while the mounts they were
    made in are still there (a stub inside a cache mount must leave the cache, not the root)."""
    for dest, stubs in reversed(mounted):
        if dest is not None:
            libc().umount2(dest.encode(), 2)  # MNT_DETACH
        remove_stubs(stubs)


def remove_stubs(stubs):
    """Remove mount stubs, deepest first, that are still empty (BuildKit's MountStubsCleaner):
    a folder the step filled stays, and so do its parents."""
    for p in reversed(stubs):
        try:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(p)  # fails (and keeps it) when not empty
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(p)
        except OSError:
            pass


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
    mount(None, path, flags="remount,bind,nosuid,nodev,noexec")
    mounted.append(path)


# --- hardening: capabilities, no_new_privs, seccomp, /proc masks ---------------------------

# The default capability set of podman and buildah (containers-common's containers.conf
# `default_capabilities`), by number: Docker's default set without NET_RAW, MKNOD and
# AUDIT_WRITE. Ping works without NET_RAW: ping_group_range is opened in the sandbox's own
# network namespace, as podman does.
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31)
# runc's defaults (libcontainer/specconv/example.go).
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 4, 22, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECCOMP_MODE_FILTER = 2
MNT_DETACH = 2
CAP_LAST = 40  # read from /proc at start-up


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def prctl(option, arg=0):
    if libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def nondumpable():
    """/proc/<pid>/{environ,exe,root,fd,mem} of this process are out of reach of every process
    without CAP_SYS_PTRACE, which no process of the sandbox has."""
    prctl(PR_SET_DUMPABLE, 0)


def read_cap_last():
    global CAP_LAST
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            CAP_LAST = int(f.read())
    except (OSError, ValueError):
        pass


def drop_bounding():
    """The default set as the bounding set (needs CAP_SETPCAP, so before setuid)."""
    for cap in range(CAP_LAST + 1):
        if cap not in DEFAULT_CAPS:
            prctl(PR_CAPBSET_DROP, cap)


def set_caps(uid):
    """Effective and permitted: the default set for root, none for another user (setuid has
    cleared them); inheritable and ambient: none, so nothing is handed on across execve."""
    mask = 0
    if uid == 0:
        for cap in DEFAULT_CAPS:
            mask |= 1 << cap
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if libc().capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass  # kernels before 4.3 have no ambient set


def load_seccomp(bpf):
    """Installs the filter (BPF bytes compiled on the host by libseccomp); the last thing
    before execve. no_new_privs is set already."""
    if not bpf:
        return
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")


def close_fds(keep=()):
    """Every descriptor but 0-2 (and `keep`, which are close-on-exec) is closed."""
    fd = 3
    for k in sorted(k for k in keep if k >= 3):
        os.closerange(fd, k)
        fd = k + 1
    os.closerange(fd, 1 << 16)


def mask_paths(root):
    """runc's masked and read-only paths, under `root`."""
    for rel in MASKED_PATHS:
        path = root + rel
        try:
            st = os.stat(path)
        except OSError:
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                mount("tmpfs", path, "tmpfs", "size=0", flags="ro,nosuid,nodev,noexec")
            else:
                mount("/dev/null", path, flags="bind")
        except OSError:
            pass  # e.g. a /proc file the kernel does not have
    for rel in READONLY_PATHS:
        path = root + rel
        if os.path.lexists(path):
            mount(path, path, flags="bind,rec")
            mount(None, path, flags="remount,bind,ro,nosuid,nodev,noexec")


def pivot(root):
    """Makes `root` this mount namespace's `/` and detaches the old root: no host path is
    reachable from here on (runc's pivot_root(".", ".") trick, no folder left in the root)."""
    os.chdir(root)
    if libc().syscall(155, b".", b".") != 0:  # SYS_pivot_root on x86_64
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    if libc().umount2(b".", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"detach the old root: {os.strerror(err)}")
    os.chdir("/")


def inside(root, path):
    """A path made before pivot(root) as the sandbox sees it."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


# --- start-up ------------------------------------------------------------------------------


def loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        import fcntl

        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def setup_root(spec):
    """The sandbox's root at spec["merged"]: the overlay (nodev), /proc with runc's masks, a
    read-only /sys, a /dev with only the usual nodes, the name files, the loopback when it has
    its own network, the hostname. Returns (created, mounted): placeholder files made in the
    upper and what was mounted on them (host paths, before pivot)."""
    root = spec["merged"]
    mount(None, "/", flags="rec,private")
    lowers = ":".join(_escape(p) for p in reversed(spec["lowers"]))  # top layer first
    overlay(
        root,
        f"lowerdir={lowers},upperdir={_escape(spec['upper'])},workdir={_escape(spec['work'])}",
        flags="nodev",
        volatile=spec.get("mode") == "step",
    )
    if os.path.isdir(root + "/proc"):
        mount("proc", root + "/proc", "proc", flags="nosuid,nodev,noexec")
    if os.path.isdir(root + "/sys"):
        try:
            mount("sysfs", root + "/sys", "sysfs", flags="nosuid,nodev,noexec,ro")
        except OSError:
            # sysfs belongs to a network namespace: one shared with the host cannot mount it
            # from a new mount namespace on every kernel; nothing then is better than the host's.
            mount("tmpfs", root + "/sys", "tmpfs", "size=0", flags="ro,nosuid,nodev,noexec")
    if os.path.isdir(root + "/dev"):
        dev = root + "/dev"
        mount("tmpfs", dev, "tmpfs", "mode=755,size=65536k", flags="nosuid,noexec")
        for node in ("null", "zero", "full", "random", "urandom", "tty"):
            os.close(os.open(f"{dev}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
            mount(f"/dev/{node}", f"{dev}/{node}", flags="bind")
        # Only the bind mounts above are devices: a node made in /dev cannot be opened.
        mount(None, dev, flags="remount,nosuid,nodev,noexec", options="mode=755,size=65536k")
        for d in ("pts", "shm", "mqueue"):
            os.mkdir(f"{dev}/{d}")
        mount(
            "devpts",
            f"{dev}/pts",
            "devpts",
            "newinstance,ptmxmode=0666,mode=620",
            flags="nosuid,noexec",
        )
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        mount("tmpfs", f"{dev}/shm", "tmpfs", "mode=1777", flags="nosuid,nodev")
        try:
            mount("mqueue", f"{dev}/mqueue", "mqueue", flags="nosuid,nodev,noexec")
        except OSError:
            os.rmdir(f"{dev}/mqueue")
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            os.symlink(target, f"{dev}/{name}")
    mask_paths(root)
    created, mounted = [], []
    for rel, src in sorted(spec.get("etc_files", {}).items()):
        bind_file(root, rel, src, created, mounted)
    loopback_up()
    if not spec.get("host_network"):
        try:  # unprivileged ICMP echo sockets (ping without CAP_NET_RAW), this netns only
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write("0 2147483647")
        except OSError:
            pass
    try:
        socket.sethostname(spec["hostname"])
    except OSError:
        pass
    return created, mounted


def become(proc, extra_env=None, keep=()):
    """In the sandbox's root already: become `proc["user"]` with Docker's default
    capabilities, no_new_privs and the seccomp filter, cd to its workdir and exec its argv
    with exactly its env (plus HOME and `extra_env`). Never returns; failures go to the status
    fd."""
    for s in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)
    uid, gid, groups, home = resolve_user(proc["user"])
    try:
        os.chdir(proc["workdir"] or "/")
    except OSError as e:
        fail(f"workdir {proc['workdir']}: {e.strerror}")
    env = proc["env"]
    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
    argv = proc["argv"]
    exe = find_exec(argv[0], path)
    if exe is None:
        fail(f'exec: "{argv[0]}": executable file not found in $PATH')
    try:
        drop_bounding()
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        fail(f"drop privileges: {e.strerror or e}")
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        fail(f"set user {proc['user']}: {e.strerror}")
    try:
        set_caps(uid)
    except OSError as e:
        fail(f"drop privileges: {e.strerror or e}")
    envd = dict(e.split("=", 1) for e in env)
    envd.setdefault("HOME", home)
    envd.update(extra_env or {})
    if proc.get("pdeathsig"):
        # After setuid (which clears it): the program dies with the helper that started it.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    close_fds((STATUS_FD, *keep))
    try:
        load_seccomp(SECCOMP)
    except OSError as e:
        fail(f"seccomp: {e.strerror or e}")
    try:
        os.execve(exe, argv, envd)
    except OSError as e:
        fail(f"exec {argv[0]}: {e.strerror}")


SECCOMP = b""  # the filter's BPF bytes, from the spec


def start(spec):
    """What every sandbox process does first: keep its /proc entries private, learn the
    filter, find libc while the host's files are still there."""
    global SECCOMP
    nondumpable()
    read_cap_last()
    SECCOMP = bytes.fromhex(spec.get("seccomp", ""))


def attach_network(sock, spec):
    """Asks the host to give this (fresh) network namespace its network (`attach`, with our
    host pid from the kernel) and waits until it has (`net`); a no-op unless the spec asks.
    The sandbox's processes start only after."""
    if not spec.get("attach"):
        return
    send(sock, "attach")
    sock.settimeout(spec.get("go_timeout", 60))
    try:
        answer = sock.recv(4096)
    except OSError:
        answer = b""
    if answer != b"net":
        raise RuntimeError(
            answer.decode("utf-8", "replace").removeprefix("error: ")
            or "the host did not attach the network"
        )


def handshake(sock, spec):
    """Tells the host `ready` (the kernel adds our host pid) and waits for `go`: the host
    attaches the network, or records the sandbox, in between."""
    send(sock, "ready")
    sock.settimeout(spec.get("go_timeout", 60))
    try:
        go = sock.recv(16)
    except OSError:
        go = b""
    sock.close()
    return go == b"go"


# --- one build step ------------------------------------------------------------------------


def main_step(spec):
    global STATUS_FD
    root = spec["merged"]
    STATUS_FD = spec["status_fd"]
    os.set_inheritable(STATUS_FD, False)
    start(spec)
    try:
        created, mounted = setup_root(spec)
    except OSError as e:
        fail(f"sandbox setup failed: {e}")
    try:
        step_mounts, secret_env = setup_mounts(
            root, spec.get("scratch", ""), spec.get("mounts", []), spec.get("secrets_fd", -1)
        )
    except OSError as e:
        fail(f"RUN --mount: {e.strerror or e}")
    try:
        pivot(root)
    except OSError as e:
        fail(f"sandbox setup failed: {e}")
    if spec.get("sock_fd", -1) >= 0:
        sock = socket.socket(fileno=spec["sock_fd"])
        try:
            attach_network(sock, spec)
        except (OSError, RuntimeError) as e:
            fail(str(e))
        sock.close()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        become(spec, secret_env)
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
    undo_mounts(
        [
            (None if d is None else inside(root, d), [inside(root, p) for p in stubs])
            for d, stubs in step_mounts
        ]
    )
    for p in reversed(mounted):
        libc().umount2(inside(root, p).encode(), MNT_DETACH)
    for p in created:
        try:
            os.unlink(inside(root, p))
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(code if code is not None else 127)


# --- a long-lived sandbox ------------------------------------------------------------------


STATE_DIR = -1  # an O_PATH descriptor of the sandbox's state folder on the host


def write_state(name, data):
    tmp = f"{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=STATE_DIR)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=STATE_DIR, dst_dir_fd=STATE_DIR)


def start_entrypoint(spec):
    """Forks the entrypoint in the sandbox; returns its pid once it has exec'd, or raises with
    the reason it could not start."""
    global STATUS_FD
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        STATUS_FD = w
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()
        become(spec["entrypoint"])
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
    sock.sendmsg(
        [text.encode("utf-8", "replace")], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)]
    )


def read_deadline():
    try:
        fd = os.open("deadline", os.O_RDONLY | os.O_CLOEXEC, dir_fd=STATE_DIR)
        try:
            text = os.read(fd, 256).decode().strip()
        finally:
            os.close(fd)
        return float(text) if text else None
    except (OSError, ValueError):
        return None


def finish(reason, code):
    write_state("exit.json", json.dumps({"reason": reason, "exit_code": code, "at": time.time()}))
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


def main_box(spec):
    global STATE_DIR
    sock = socket.socket(fileno=spec["sock_fd"])
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        start(spec)
        STATE_DIR = os.open(spec["state_dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root = spec["merged"]
        created, _mounted = setup_root(spec)
        write_state("placeholders.json", json.dumps([os.path.relpath(p, root) for p in created]))
        pivot(root)
        attach_network(sock, spec)
        entry = start_entrypoint(spec) if spec["entrypoint"] else None
    except (OSError, RuntimeError, SystemExit) as e:
        send(sock, f"error: {e}")
        os._exit(1)
    if not handshake(sock, spec):
        finish("the host did not confirm the start", None)

    while True:
        deadline = read_deadline()
        if deadline is not None and time.time() >= deadline:
            finish("timeout", None)
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
                finish("entrypoint exited", 128 - code if code < 0 else code)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            finish("terminated", None)


def main(spec):
    """Called by the launcher's bootstrap in the new namespaces (all but the PID one, which
    only this process's children join). Forks PID 1; this process, outside the sandbox's PID
    namespace, waits for it (a build step) or leaves it to the host's init (a sandbox)."""
    pid = os.fork()
    if pid == 0:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL) if spec["mode"] == "step" else None
        if spec["mode"] == "box":
            main_box(spec)
        else:
            main_step(spec)
        os._exit(127)
    if spec["mode"] == "box":
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)
