"""PID 1 of a namespace sandbox: one build step (`mode: step`) or a long-lived sandbox
(`mode: box`). `main` runs in a launcher the spawner (`_spawn.py`, which imported this
module once) forked; the JSON spec arrives on a pipe, never in argv.

Standalone on purpose: it imports nothing from tlimage (the spawner and the exec helper
`_enter.py` import it by path), so it keeps running if tlimage is upgraded. As host root in a
private mount namespace it mounts the overlay root (and a step's RUN mounts) over idmapped
layers (see `main`); its child joins the sandbox's user namespace and makes the others, and
PID 1 mounts the pseudo filesystems and pivots, then:

- step: forks the step (user, workdir, exec), reaps every process in the PID namespace until
  the step exits and exits with the step's code; the host side then undoes the RUN mounts and
  placeholder files. Failures before the step's exec are written to `status_fd` (closed on exec) and
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
import fcntl
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


# --- the user namespace: ids 0..N-1 inside are a range of unprivileged host ids ------------
#
# Layers on disk keep the real ids (0 is root): the overlay's lowers, its upper folder and
# every host folder bound in are idmapped mounts (open_tree + mount_setattr(MOUNT_ATTR_IDMAP)
# + move_mount, as crun and runc do), so a file root makes inside lands as uid 0 in the diff
# and `chown 1000` lands as 1000. The overlays are mounted by host root acting as the range's
# first id (setfsuid), so overlayfs writes its upper through the idmapped mount with ids the
# mount can map, and keeps host root's capabilities for its own xattrs and copy-up.

CLONE_NEWUSER = 0x10000000
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 1, 0o2000000, 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MOUNT_ATTR_IDMAP = 0x100000
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # one number on every arch
IDMAP = None  # [host uid of 0, host gid of 0, how many], from the spec; None: no user namespace
USERNS_FD = -1  # the sandbox's user namespace, while the host side sets it up
_IDMAPPED = []  # paths whose mount is idmapped in this mount namespace


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _sys(nr, what, *args):
    rc = libc().syscall(nr, *args)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def host_uid(uid):
    return uid + IDMAP[0] if IDMAP else uid


def host_gid(gid):
    return gid + IDMAP[1] if IDMAP else gid


def owner_opts():
    """tmpfs options that make its root owned by the sandbox's root."""
    return f",uid={IDMAP[0]},gid={IDMAP[1]}" if IDMAP else ""


def userns_of(pid, idmap):
    """Writes `idmap` as the uid and gid maps of the user namespace `pid` made (unshared,
    not yet mapped); returns a descriptor of it."""
    uid, gid, count = idmap
    for name, base in (("uid_map", uid), ("gid_map", gid)):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, f"0 {base} {count}\n".encode())
        finally:
            os.close(fd)
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def make_userns(idmap):
    """A new user namespace with `idmap` as its maps, made by a child that then ends (the
    namespace lives on as long as the descriptor returned)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    r2, w2 = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(w2)
        code = 0 if libc().unshare(CLONE_NEWUSER) == 0 else 1
        os.write(w, b"u" if code == 0 else os.strerror(ctypes.get_errno()).encode())
        os.read(r2, 1)  # until the host has what it needs
        os._exit(code)
    os.close(w)
    os.close(r2)
    try:
        said = os.read(r, 256)
        if said != b"u":
            raise OSError(1, f"unshare a user namespace: {said.decode(errors='replace')}")
        return userns_of(pid, idmap)
    finally:
        os.close(r)
        os.close(w2)
        os.waitpid(pid, 0)


def idmapped(path):
    """True when `path` is on a mount idmapped here already."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in _IDMAPPED)


def idmapped_clone(path, attrs=0):
    """A detached copy of the mount at `path`, idmapped through the sandbox's user namespace
    (plus mount `attrs`); `attach` puts it somewhere."""
    fd = _sys(SYS_OPEN_TREE, f"open_tree {path}", AT_FDCWD, path.encode(),
              OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)  # fmt: skip
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | attrs, 0, 0, USERNS_FD)
        _sys(SYS_MOUNT_SETATTR, f"idmap {path}", fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
             ctypes.sizeof(attr))  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(fd, target):
    """Mounts the detached mount `fd` on `target` (a folder on a file, or the other way round,
    is ENOTDIR as mount(2) says it)."""
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode) != os.path.isdir(target):
            raise OSError(20, f"move_mount to {target}: {os.strerror(20)}")
        _sys(SYS_MOVE_MOUNT, f"move_mount to {target}", fd, b"", AT_FDCWD, target.encode(),
             MOVE_MOUNT_F_EMPTY_PATH)  # fmt: skip
    finally:
        os.close(fd)


def idmap_in_place(paths):
    """Each of `paths` (a parent before its children, which it then covers) becomes an
    idmapped mount of itself."""
    for path in sorted(set(paths), key=len):
        if not idmapped(path):
            attach(idmapped_clone(path), path)
            _IDMAPPED.append(path)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def act_as_sandbox_root(on):
    """File operations as the sandbox's root (its host uid and gid) with host root's
    capabilities kept (`on`), or as host root again. What is made in the overlay then lands
    as uid 0 in the upper."""
    if not IDMAP:
        return
    death = ctypes.c_int(0)  # a change of fsuid clears the parent-death signal: kept here
    libc().prctl(2, ctypes.byref(death), 0, 0, 0)  # PR_GET_PDEATHSIG
    parent = os.getppid()
    libc().setfsuid(IDMAP[0] if on else 0)
    libc().setfsgid(IDMAP[1] if on else 0)
    if death.value:
        prctl(PR_SET_PDEATHSIG, death.value)
        if os.getppid() != parent:  # it died in between
            os._exit(128 + death.value)
    if on:  # a non-zero fsuid clears the file capabilities from the effective set: restore
        hdr = _CapHeader(0x20080522, 0)
        data = (_CapData * 2)()
        if libc().capget(ctypes.byref(hdr), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"capget: {os.strerror(err)}")
        for d in data:
            d.effective = d.permitted
        if libc().capset(ctypes.byref(hdr), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"capset: {os.strerror(err)}")


def join_userns(fd):
    """Enter the user namespace `fd` as its root (the range's first host id)."""
    if libc().setns(fd, CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"join the user namespace: {os.strerror(err)}")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


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
                os.fchown(fd, host_uid(m["uid"]), host_gid(m["gid"]))
                os.fchmod(fd, m["mode"])
            finally:
                os.close(fd)
        elif kind == "bind":
            src = m["source"]
        elif kind == "view":
            stage = os.path.join(scratch, f"m{i}")  # made by stage_views
            layers = list(m["layers"])
            opts = ""
            if m["readonly"] and len(layers) == 1:
                layers.append(stage + "/empty")  # overlayfs needs two lowers when it has no upper
            if not m["readonly"]:
                top = os.stat(layers[-1])  # the merged root shows the upper's owner and mode
                os.chown(stage + "/upper", top.st_uid, top.st_gid)
                os.chmod(stage + "/upper", stat.S_IMODE(top.st_mode))
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
                mount("tmpfs", dest, "tmpfs", f"mode=1777{size}{owner_opts()}",
                      flags="nosuid,nodev")  # fmt: skip
                mounted[-1] = (dest, stubs)
            elif kind == "bind" and IDMAP and not idmapped(src):
                # A host folder (a cache mount): the step's ids land as the real ones in it.
                attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                attach(idmapped_clone(src, attrs | (MOUNT_ATTR_RDONLY if m["readonly"] else 0)),
                       dest)  # fmt: skip
                mounted[-1] = (dest, stubs)
            else:
                mount(src, dest, flags="bind")
                mounted[-1] = (dest, stubs)
                # a device node in a mount can never be opened
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
    src = os.path.realpath(src)
    if IDMAP and not idmapped(src):  # root inside may write it, as before
        attach(idmapped_clone(src, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC), path)
    else:
        mount(src, path, flags="bind")
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
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def stage_views(scratch, mounts):
    """The folders of each RUN mount view's overlay, made before the idmapped mounts."""
    paths = []
    for i, m in enumerate(mounts):
        if m["kind"] != "view":
            continue
        stage = os.path.join(scratch, f"m{i}")
        os.mkdir(stage)
        os.mkdir(stage + "/root")
        if m["readonly"] and len(m["layers"]) == 1:
            os.mkdir(stage + "/empty")
        if not m["readonly"]:
            os.mkdir(stage + "/upper")
            os.mkdir(stage + "/work")
            paths.append(stage)
        paths.extend(m["layers"])
    return paths


def setup_host(spec):
    """The host side of the sandbox's root, in a private mount namespace as host root: the
    overlay at spec["merged"] (nodev; its layers idmapped when the sandbox has a user
    namespace), the name files and, for a step, its RUN mounts. Returns (created, mounted,
    step_mounts, secret_env): placeholder files made in the upper, what was mounted on them,
    the RUN mounts with their stubs, and the step's secret variables (all host paths)."""
    root = spec["merged"]
    mount(None, "/", flags="rec,private")
    mounts = spec.get("mounts", [])
    views = stage_views(spec.get("scratch", ""), mounts)
    if IDMAP:  # USERNS_FD: the sandbox's (main) or a probe's (make_userns)
        upper_parent = os.path.commonpath([spec["upper"], spec["work"]])
        idmap_in_place([*spec["lowers"], upper_parent, *views])
        act_as_sandbox_root(True)
    lowers = ":".join(_escape(p) for p in reversed(spec["lowers"]))  # top layer first
    overlay(
        root,
        f"lowerdir={lowers},upperdir={_escape(spec['upper'])},workdir={_escape(spec['work'])}",
        flags="nodev",
        volatile=spec.get("mode") == "step",
    )
    created, mounted = [], []
    for rel, src in sorted(spec.get("etc_files", {}).items()):
        bind_file(root, rel, src, created, mounted)
    try:
        step_mounts, secret_env = setup_mounts(
            root, spec.get("scratch", ""), mounts, spec.get("secrets_fd", -1)
        )
    except OSError as e:
        raise MountFailure(f"RUN --mount: {e.strerror or e}") from None
    return created, mounted, step_mounts, secret_env


class MountFailure(Exception):
    """A RUN mount could not be made (said as such, not as a sandbox failure)."""


def setup_ns(spec):
    """In the sandbox's namespaces (and user namespace), its working folder the root made by
    setup_host: a copy of that root becomes a mount of its own here (pivot_root needs one this
    namespace made), then /proc with runc's masks, a read-only /sys, a /dev with only the
    usual nodes, the loopback when it has its own network, the hostname."""
    tree = _sys(SYS_OPEN_TREE, "open_tree of the root", AT_FDCWD, b".",
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)  # fmt: skip
    _sys(SYS_MOVE_MOUNT, "mount the root", tree, b"", AT_FDCWD, b".", MOVE_MOUNT_F_EMPTY_PATH)
    os.fchdir(tree)  # the new mount, on top
    os.close(tree)
    root = "."
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
            # read-only: the node works, but neither its mode nor its owner (the host's own
            # node) can be changed, even by a root that has the host's ids
            mount(None, f"{dev}/{node}", flags="remount,bind,ro,nosuid,noexec")
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
    loopback_up()
    if not spec.get("host_network"):
        try:  # unprivileged ICMP echo sockets (ping without CAP_NET_RAW), this netns only
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write(f"0 {IDMAP[2] - 1 if IDMAP else 2147483647}")
        except OSError:
            pass
    try:
        socket.sethostname(spec["hostname"])
    except OSError:
        pass


def become(proc, extra_env=None, keep=()):
    """In the sandbox's root already: become `proc["user"]` with Docker's default
    capabilities, no_new_privs and the seccomp filter, cd to its workdir and exec its argv
    with exactly its env (plus HOME and `extra_env`). Never returns; failures go to the status
    fd."""
    # Every signal at its default action, none blocked, whatever the caller had: one started in
    # the background has SIGINT and SIGQUIT ignored, which would survive the exec.
    for s in signal.valid_signals():
        if s not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(s, signal.SIG_DFL)
            except (OSError, ValueError):  # the real-time ones libc keeps for itself
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.umask(0o022)  # runc's and Docker's: not the caller's, so a step's files never depend on it
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
    """PID 1 of a step (the host side made its root and RUN mounts): the rest of the root,
    pivot, network, then the step; reaps every process until the step exits and exits with
    its code."""
    try:
        setup_ns(spec)
        pivot(".")
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
        become(spec, spec["secret_env"])
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
    sys.stdout.flush()
    os._exit(code if code is not None else 127)


def undo_step(created, mounted, step_mounts):
    """After the step, on the host side: RUN mounts and name files off the root, and the
    placeholders and stubs made for them out of the upper."""
    undo_mounts(step_mounts)
    for p in reversed(mounted):
        libc().umount2(p.encode(), MNT_DETACH)
    for p in created:
        try:
            os.unlink(p)
        except OSError:
            pass


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
    sock = socket.socket(fileno=spec["sock_fd"])
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        setup_ns(spec)
        pivot(".")
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


def abort(spec, msg):
    if spec["mode"] == "step":
        fail(msg)
    try:
        send(socket.socket(fileno=spec["sock_fd"]), f"error: {msg}")
    finally:
        os._exit(1)


def main(spec):
    """Called by the launcher's bootstrap as host root in a private mount namespace. Forks a
    child first, which makes the sandbox's user namespace (when it has one) and waits; this
    process writes that namespace's id maps, sets up the root with it (setup_host) and hands
    the child the root (a descriptor) and the step's secret variables. The child becomes the
    namespace's root, makes the other namespaces (owned by it) and forks PID 1; for a step it
    waits for PID 1, and this process then takes the RUN mounts and placeholders off the
    root and exits with the step's code. A sandbox's PID 1 is left to the host's init."""
    global STATUS_FD, STATE_DIR, IDMAP, USERNS_FD
    step = spec["mode"] == "step"
    if step:
        STATUS_FD = spec["status_fd"]
        os.set_inheritable(STATUS_FD, False)
    IDMAP = spec.get("idmap")
    start(spec)
    if not step:
        try:
            STATE_DIR = os.open(spec["state_dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if IDMAP:  # PID 1 writes exit.json there as the sandbox's root
                os.chown(spec["state_dir"], IDMAP[0], IDMAP[1])
        except OSError as e:
            abort(spec, f"sandbox setup failed: {e}")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    k = os.fork()
    if k == 0:
        mine.close()
        sandbox_parent(spec, theirs, step)
    theirs.close()
    try:
        said = mine.recv(4096)
        if said != b"u":
            raise OSError(1, said.decode("utf-8", "replace") or "the sandbox's parent died")
        if IDMAP:
            USERNS_FD = userns_of(k, IDMAP)
        created, mounted, step_mounts, secret_env = setup_host(spec)
        if not step:
            root = spec["merged"]
            write_state("placeholders.json",
                        json.dumps([os.path.relpath(p, root) for p in created]))  # fmt: skip
        fd = os.open(spec["merged"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        socket.send_fds(mine, [json.dumps(secret_env).encode()], [fd])
        os.close(fd)
    except (MountFailure, OSError) as e:
        os.kill(k, signal.SIGKILL)
        os.waitpid(k, 0)
        if isinstance(e, MountFailure):
            abort(spec, str(e))
        abort(spec, f"sandbox setup failed: {e}")
    mine.close()
    _, status = os.waitpid(k, 0)
    if not step:
        os._exit(0)
    code = os.waitstatus_to_exitcode(status)
    undo_step(created, mounted, step_mounts)
    sys.stdout.flush()
    os._exit(128 - code if code < 0 else code)


def sandbox_parent(spec, sock, step):
    """The child of main: unshares the user namespace (its maps come from the host side),
    waits for the root, becomes the namespace's root (the range's first host id), makes the
    other namespaces and forks PID 1. Never returns."""
    try:
        if IDMAP and libc().unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            sock.send(f"unshare a user namespace: {os.strerror(err)}".encode())
            os._exit(1)
        sock.send(b"u")
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
        sock.close()
        if not fds:
            os._exit(1)  # the host side failed, and says why
        spec["secret_env"] = json.loads(msg)
        os.fchdir(fds[0])
        os.close(fds[0])
        if IDMAP:
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
        if step:  # after the change of credentials, which clears it
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if libc().unshare(spec["ns_flags"]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare: {os.strerror(err)}")
    except OSError as e:
        abort(spec, f"sandbox setup failed: {e}")
    pid = os.fork()
    if pid == 0:
        if step:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            main_step(spec)
        else:
            main_box(spec)
        os._exit(127)
    if not step:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


def probe(tmp, idmap):
    """Whether this kernel gives a sandbox its user namespace (run by the host once, in a
    process of its own, in the empty folder `tmp`): the root of an idmapped overlay makes a
    file and chowns one to 1000 from inside; on disk they must be 0 and 1000. Prints `ok` or
    what failed."""
    global IDMAP, USERNS_FD
    IDMAP = idmap
    try:
        if libc().unshare(0x00020000) != 0:
            raise OSError(ctypes.get_errno(), "unshare the mount namespace")
        for d in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(tmp, d))
        with open(os.path.join(tmp, "lower", "f"), "w") as f:
            f.write("x")
        disk = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
        USERNS_FD = make_userns(idmap)
        spec = {"merged": tmp + "/merged", "lowers": [tmp + "/lower"], "upper": tmp + "/upper",
                "work": tmp + "/work"}  # fmt: skip
        setup_host(spec)
        os.chdir(tmp + "/merged")
        pid = os.fork()
        if pid == 0:
            try:
                join_userns(USERNS_FD)
                with open("new", "w") as f:
                    f.write("x")
                os.chown("f", 1000, 1000)  # a copy-up
                os._exit(0 if os.stat("f").st_uid == 1000 else 2)
            except BaseException as e:
                os.write(2, f"{e}\n".encode())
                os._exit(1)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0:
            raise OSError(5, f"a file operation as the sandbox's root failed ({code})")
        owners = [os.stat(f"upper/{n}", dir_fd=disk).st_uid for n in ("new", "f")]
        if owners != [0, 1000]:
            raise OSError(5, f"files made inside land on disk as {owners}, not [0, 1000]")
        print("ok")
    except OSError as e:
        print(e)
