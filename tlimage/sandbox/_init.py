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


def _escape(path):
    """A path as one overlayfs option value (`:` separates lowers, `,` options)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


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
            mount("overlay", stage + "/root", "overlay",
                  f"lowerdir={lowers}{opts},redirect_dir=off,metacopy=off,index=off")
            try:
                src = resolve_in_root(stage + "/root", m["subpath"])
            except OSError as e:
                raise OSError(e.errno, f"mount source {m['subpath']!r} for {target}: "
                              f"{e.strerror or e}") from None
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
            if m["readonly"] and kind != "tmpfs":
                mount(None, dest, flags="remount,bind,ro,nosuid,nodev")
        except OSError as e:  # name the target in the step's root, not the host path
            raise OSError(e.errno, f"cannot mount {kind} at {target}: "
                          f"{os.strerror(e.errno or 5)}") from None
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
    mounted.append(path)


def read_spec(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return json.loads(b"".join(chunks))


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
    """The sandbox's root at spec["merged"]: the overlay, /proc, /sys, /dev, the host's name
    files when it shares the host's network, the loopback when it does not, the hostname.
    Returns (created, mounted): placeholder files made in the upper and what was mounted on
    them, to undo before the end."""
    root = spec["merged"]
    mount(None, "/", flags="rec,private")
    lowers = ":".join(_escape(p) for p in reversed(spec["lowers"]))  # top layer first
    mount("overlay", root, "overlay",
          f"lowerdir={lowers},upperdir={_escape(spec['upper'])},workdir={_escape(spec['work'])},"
          "redirect_dir=off,metacopy=off,index=off")
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
        for d in ("pts", "shm", "mqueue"):
            os.mkdir(f"{dev}/{d}")
        mount("devpts", f"{dev}/pts", "devpts", "newinstance,ptmxmode=0666,mode=620",
              flags="nosuid,noexec")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        mount("tmpfs", f"{dev}/shm", "tmpfs", "mode=1777", flags="nosuid,nodev")
        try:
            mount("mqueue", f"{dev}/mqueue", "mqueue", flags="nosuid,nodev,noexec")
        except OSError:
            os.rmdir(f"{dev}/mqueue")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{dev}/{name}")
    created, mounted = [], []
    if spec["network"]:
        bind_file(root, "/etc/resolv.conf", "/etc/resolv.conf", created, mounted)
        bind_file(root, "/etc/hosts", "/etc/hosts", created, mounted)
    else:
        loopback_up()
    try:
        socket.sethostname(spec["hostname"])
    except OSError:
        pass
    return created, mounted


def become(proc, extra_env=None):
    """In the sandbox's root already: become `proc["user"]`, cd to its workdir and exec its
    argv with exactly its env (plus HOME and `extra_env`). Never returns; failures go to the
    status fd."""
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
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        fail(f"set user {proc['user']}: {e.strerror}")
    envd = dict(e.split("=", 1) for e in env)
    envd.setdefault("HOME", home)
    envd.update(extra_env or {})
    if proc.get("pdeathsig"):
        # After setuid (which clears it): the program dies with the helper that started it.
        libc().prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        os.execve(exe, argv, envd)
    except OSError as e:
        fail(f"exec {argv[0]}: {e.strerror}")


def enter_root(root):
    try:
        os.chroot(root)
        os.chdir("/")
    except OSError as e:
        fail(f"cannot enter the sandbox root: {e.strerror}")


# --- one build step ------------------------------------------------------------------------


def main_step(spec):
    global STATUS_FD
    root = spec["merged"]
    STATUS_FD = spec["status_fd"]
    os.set_inheritable(STATUS_FD, False)
    try:
        created, mounted = setup_root(spec)
    except OSError as e:
        fail(f"sandbox setup failed: {e}")
    try:
        step_mounts, secret_env = setup_mounts(
            root, spec.get("scratch", ""), spec.get("mounts", []), spec.get("secrets_fd", -1))
    except OSError as e:
        fail(f"RUN --mount: {e.strerror or e}")
    pid = os.fork()
    if pid == 0:
        os.setsid()
        enter_root(root)
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
    undo_mounts(step_mounts)
    for p in reversed(mounted):
        libc().umount2(p.encode(), 2)  # MNT_DETACH
    for p in created:
        try:
            os.unlink(p)
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(code if code is not None else 127)


# --- a long-lived sandbox ------------------------------------------------------------------


def write_atomic(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def start_entrypoint(spec):
    """Forks the entrypoint chrooted into the sandbox; returns its pid once it has exec'd, or
    raises with the reason it could not start."""
    global STATUS_FD
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        STATUS_FD = w
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()
        enter_root(spec["merged"])
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


def main_box(spec):
    sock = socket.socket(fileno=spec["sock_fd"])
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        for procs in spec["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write("0")
        created, _mounted = setup_root(spec)
        root = spec["merged"]
        write_atomic(spec["placeholders_file"],
                     json.dumps([os.path.relpath(p, root) for p in created]))
        entry = start_entrypoint(spec) if spec["entrypoint"] else None
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


def main():
    spec = read_spec(int(sys.argv[1]))
    if spec["mode"] == "box":
        main_box(spec)
    else:
        main_step(spec)


if __name__ == "__main__":
    main()
