"""The host side of namespace isolation, shared by build steps and long-lived sandboxes.

    tlimage-spawn -I -S /dev/fd/B S     python, one per calling process (spawner.py), that
      │                                 imported _init once and forks every launcher
      └─ launcher (_init.main)          host root in a private mount namespace (unshared
         │                              there): writes the id maps of the user namespace its
         │                              child made, idmaps the layers through it, mounts the
         │                              overlay root and RUN mounts, hands the child the root
         └─ child                       unshares the user namespace, then (as its root) mount,
            └─ PID 1 (_init.main_step/box)  UTS, IPC, cgroup, PID and network namespaces
                                        (owned by it); PID 1 mounts /proc, /sys, /dev, pivots
    tlimage-enter -I -S /dev/fd/B S     python on the host that setns()es into a running one
      └─ exec / cp in / cp out          (_enter.py), user namespace first, after importing all

A started program is a tiny bootstrap read from pipe B with its spec as JSON on pipe S (a
launcher gets its spec on a pipe from the spawner), so no host path or configuration is in
any argv, environment or file the sandbox can reach; `_init.py`, `_spawn.py` and `_enter.py`
are imported from this folder by the bootstrap. PID 1 pivots into
the sandbox's root (the old root detached) and marks itself non-dumpable, so /proc/1/root,
/proc/1/exe and /proc/1/environ show nothing of the host.

`run_step` runs one build step to its end (PID 1 exits with the step's code); `start_box`
starts a sandbox that outlives this process (its PID 1 is left to the host's init) and returns
once its PID 1 said it is ready; `enter` starts a process in a running one.

All mounts live in the sandbox's private mount namespace, so they disappear with its last
process; killing the launcher (on timeout, Ctrl-C or a crash of this process) kills the
sandbox's PID 1 and with it every process of the sandbox.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tlimage.errors import TlimageError
from tlimage.sandbox import cgroup, harden, network, spawner

HERE = Path(__file__).resolve().parent
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x20000000, 0x40000000
# The host ids the sandbox's ids stand for when /etc/subuid and /etc/subgid have no `tlimage`
# entry: 2^31 on, above every range useradd (subordinate ids from 100000), systemd (dynamic
# users, nspawn's 0x80000..0x6fffffff) or a login gives out, so they belong to no one on the
# host. All of that half is mapped (0..2^31-3 inside, up to 2^32-3 outside; 2^32-2 and -1
# stay out), so a layer's file owned by any id a real image uses (npm's tarball ids, 1000000
# and up) can still be changed and chowned inside; a subuid entry maps as many as it has
# (at least MIN_COUNT). One range serves every step and sandbox (each has its own user namespace):
# layers on disk keep their real ids through idmapped mounts, so the range only decides who
# a process is to the host kernel, and sandboxes are kept apart by their other namespaces.
DEFAULT_ID_BASE, DEFAULT_ID_COUNT, MIN_COUNT = 1 << 31, (1 << 31) - 2, 65536
USERNS_ENV = "TLIMAGE_USERNS"  # 0: no user namespace (as on a kernel without one)
BOOT = """import json, os, sys
os.close(int(sys.argv[0].rpartition("/")[2]))  # this program's pipe: read already
fd = int(sys.argv[1])
chunks = []
while True:
    b = os.read(fd, 1 << 20)
    if not b:
        break
    chunks.append(b)
os.close(fd)
spec = json.loads(b"".join(chunks))
sys.path.insert(0, spec["lib"])
import {module} as m
m.main(spec)
"""

Output = Callable[[str, bytes], None]
OOM_CODE = 137  # 128 + SIGKILL


class SandboxError(TlimageError):
    """The sandbox could not be started or entered; the message says why (callers wrap it in
    their own error class)."""


def check_host() -> str | None:
    """None when this host can run namespace sandboxes, else the reason it cannot."""
    if os.geteuid() != 0:
        return "namespace isolation needs root (it mounts overlayfs and makes namespaces)"
    return None


def missing_layers() -> list[str]:
    """The layers of isolation this host cannot give a namespace sandbox, each with its
    reason (empty: all of them)."""
    out = []
    try:
        harden.seccomp_bpf()
    except harden.Unavailable as e:
        out.append(str(e))
    problem = network.check_host("allow")
    if problem:
        out.append(f"no private network for steps and sandboxes with network: {problem}")
    return out + cgroup.missing()


def id_range(files: tuple[str, str] = ("/etc/subuid", "/etc/subgid")) -> tuple[int, int, int]:
    """(host uid of root inside, host gid of root inside, count): a `tlimage` entry of
    /etc/subuid and /etc/subgid with at least MIN_COUNT ids (its count, the smaller of the
    two), else DEFAULT_ID_BASE and DEFAULT_ID_COUNT."""
    bases = []
    for path in files:
        base = None
        with contextlib.suppress(OSError, ValueError):
            for line in Path(path).read_text().splitlines():
                name, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if name == "tlimage" and int(count) >= MIN_COUNT:
                    base = (int(start), int(count))
                    break
        bases.append(base)
    if bases[0] is None or bases[1] is None:
        return DEFAULT_ID_BASE, DEFAULT_ID_BASE, DEFAULT_ID_COUNT
    return bases[0][0], bases[1][0], min(bases[0][1], bases[1][1])


_userns_memo: dict[str, str | None] = {}


def userns_problem() -> str | None:
    """None when steps and sandboxes get a user namespace of their own with idmapped layers,
    else why not. Probed once per kernel boot (a process that makes one, cached with the
    seccomp filter); $TLIMAGE_USERNS=0 turns it off."""
    if os.environ.get(USERNS_ENV) == "0":
        return f"user namespaces are off (${USERNS_ENV}=0)"
    if "r" in _userns_memo:
        return _userns_memo["r"]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    key = f"{os.uname().release} {boot} {id_range()}"
    cache = harden.cache_dir().parent / "userns-probe.json"
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            _userns_memo["r"] = data["problem"]
            return data["problem"]
    problem = _probe_userns()
    _userns_memo["r"] = problem
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "problem": problem}))
        os.replace(tmp, cache)
    return problem


def _probe_userns() -> str | None:
    import shutil
    import tempfile

    if os.geteuid() != 0:
        return "not root"
    where = harden.cache_dir().parent  # on the disk the layers are on, as a rule
    with contextlib.suppress(OSError):
        where.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tl-userns-", dir=where if where.is_dir() else None)
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import _init; "
            f"_init.probe({tmp!r}, {list(id_range())!r})")  # fmt: skip
    try:
        p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                           text=True, timeout=30, check=False)  # fmt: skip
        out = (p.stdout.strip() or p.stderr.strip()[-300:]).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out = str(e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out == "ok":
        return None
    return f"this kernel cannot give sandboxes a user namespace with idmapped layers ({out})"


USERNS_LOST = ("root in build steps and sandboxes is the host's root (with podman's default "
               "capabilities and the seccomp filter), not an unprivileged host id")  # fmt: skip


def userns_notice() -> str | None:
    """What a host without user namespaces for sandboxes loses, or None."""
    problem = userns_problem()
    return None if problem is None else f"{problem}: {USERNS_LOST}"


def idmap() -> list[int] | None:
    """The spec's `idmap`: [host uid, host gid, count], or None without a user namespace."""
    return None if userns_problem() else list(id_range())


def _seccomp(unsafe: bool) -> str:
    """The filter as hex for the spec; raises SandboxError naming every missing layer unless
    `unsafe` (the caller has said so to the user)."""
    if not unsafe:
        lack = missing_layers()
        if lack:
            raise SandboxError("this host cannot isolate a namespace sandbox fully: "
                               + "; ".join(lack)
                               + " (use --isolation namespace-unsafe to run anyway)")  # fmt: skip
    try:
        return harden.seccomp_bpf().hex()
    except harden.Unavailable:
        return ""


def oom_message(memory_mb: int | None) -> str:
    limit = f" (limit {memory_mb} MiB)" if memory_mb else ""
    return f"out of memory: the kernel killed the process{limit}; exit code {OOM_CODE}"


HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"


def root_spec(lowers: list[Path] | tuple[Path, ...], upper: Path, work: Path, merged: Path,
              *, network: bool, hostname: str, files_dir: Path) -> dict:  # fmt: skip
    """The part of an init spec that describes the sandbox's root and namespaces. The sandbox
    always gets a fresh network namespace; with `network` the host attaches a user-mode
    network to it (sandbox/network.py) and the sandbox's /etc/resolv.conf and /etc/hosts are
    files in `files_dir` bound over its own (writes to them stay there). Only on a host
    without the network helper (the user accepted `namespace-unsafe`) does a sandbox with
    network share the host's namespace, with copies of the host's two files."""
    etc: dict[str, str] = {}
    shared = network and bool(network_helper_missing())
    if network:
        for name in ("resolv.conf", "hosts"):
            path = files_dir / name
            if shared:
                with contextlib.suppress(OSError):
                    path.write_bytes(Path("/etc", name).read_bytes())
            else:  # resolv.conf is written once the network is attached
                path.write_text(HOSTS.format(name=hostname) if name == "hosts" else "")
            if path.exists():
                etc[f"/etc/{name}"] = str(path.resolve())
    return {
        "lowers": [str(p.resolve()) for p in lowers],
        "upper": str(upper.resolve()),
        "work": str(work.resolve()),
        "merged": str(merged.resolve()),
        "network": network,
        "host_network": shared,
        "attach": network and not shared,
        "hostname": hostname,
        "etc_files": etc,
    }


def network_helper_missing() -> str | None:
    return network.check_host("allow")


def _recv(sock: socket.socket, timeout: float) -> tuple[str, int | None]:
    """One message of PID 1 and its host pid (from the kernel's credentials); ("", None) when
    it ended first."""
    sock.settimeout(timeout)
    try:
        msg, anc, _fl, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    except (TimeoutError, OSError):
        return "", None
    pid = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", data[:12])[0]
    return msg.decode("utf-8", "replace"), pid


def _give_network(sock: socket.socket, pid: int, spec: dict,
                  exit_fd: int | None = None) -> network.NetHandle:  # fmt: skip
    """Attaches the user-mode network to the namespace of `pid`, writes the sandbox's
    resolv.conf (in place: it is bound into the sandbox) and lets PID 1 go on."""
    try:
        policy = network.NetworkPolicy.from_json(spec.get("network_policy") or {})
        handle = network.attach(pid, policy, exit_fd=exit_fd)
    except Exception as e:
        with contextlib.suppress(OSError):
            sock.send(f"error: {e}".encode())
        raise SandboxError(f"the sandbox's network: {e}") from None
    try:
        resolv = spec["etc_files"].get("/etc/resolv.conf")
        if resolv:
            with open(resolv, "r+b") as f:
                f.truncate(0)
                f.write(handle.resolv_conf.encode())
        sock.send(b"net")
    except BaseException:
        handle.close()
        raise
    return handle


def _launch(module: str, spec: dict, *, unshare: int = 0, cgroup_procs: list[str] = (),
            die_with_parent: bool = False, pass_fds: tuple[int, ...] = (),
            **popen: object) -> subprocess.Popen:  # fmt: skip
    """Starts `module.main(spec)` in a fresh Python: in new namespaces (`unshare` flags, taken
    in the child before exec, after joining the cgroups) or, without them, as it is."""
    boot_r, boot_w = os.pipe()
    spec_r, spec_w = os.pipe()
    try:
        os.write(boot_w, BOOT.format(module=module).encode())  # far below a pipe's buffer
        os.close(boot_w)
        boot_w = -1
        libc = ctypes.CDLL(None, use_errno=True)
        procs = [p.encode() for p in cgroup_procs]

        def pre() -> None:  # in the child, between fork and exec
            if die_with_parent:
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            for f in procs:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            if unshare and libc.unshare(unshare) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare: {os.strerror(err)}")

        proc = subprocess.Popen(
            [f"tlimage-{module.strip('_')}", "-I", "-S", f"/dev/fd/{boot_r}", str(spec_r)],
            executable=sys.executable, pass_fds=(boot_r, spec_r, *pass_fds),
            preexec_fn=pre if (unshare or procs or die_with_parent) else None,
            env={"PATH": TOOL_PATH}, **popen)  # type: ignore[arg-type]  # fmt: skip
    except BaseException:
        for fd in (boot_r, boot_w, spec_r, spec_w):
            if fd >= 0:
                os.close(fd)
        raise
    os.close(boot_r)
    os.close(spec_r)
    spawner.write_and_close(spec_w, json.dumps({**spec, "lib": str(HERE)}).encode())
    return proc


def _spawn(spec: dict, **kw: object) -> spawner.Launched:
    """`_init.main(spec)` forked by the spawner (see _launch for the arguments)."""
    try:
        return spawner.launch("_init", json.dumps({**spec, "lib": str(HERE)}).encode(), **kw)
    except (spawner.SpawnError, OSError) as e:
        raise SandboxError(f"the sandbox could not start: {e}") from None


def _flags(spec: dict) -> int:
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWCGROUP
    return flags if spec.get("host_network") else flags | CLONE_NEWNET


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
             on_timeout: Callable[[], BaseException], unsafe: bool = False,
             memory_mb: int | None = None, cpus: float | None = None,
             pids: int | None = cgroup.DEFAULT_PIDS) -> int:  # fmt: skip
    """Runs the step `spec` describes (see _init.main_step) and returns its exit code (128+N
    for signal N). Output goes to `emit` as it comes; past `timeout` seconds the sandbox is
    killed and `on_timeout()` raised. A failure before the step's exec raises SandboxError.
    The step runs in a cgroup of its own with the given limits; an out-of-memory kill is said
    on stderr (the code stays 137)."""
    seccomp = _seccomp(unsafe)
    cg, _notes = cgroup.Cgroup.create(f"step-{os.getpid()}-{time.monotonic_ns()}", cpus,
                                      memory_mb, pids)  # fmt: skip
    try:
        code = _run_step({**spec, "seccomp": seccomp,
                          "cgroup_procs": cg.procs_files() if cg else []},
                         secrets, emit, timeout, on_timeout)  # fmt: skip
        if code == OOM_CODE and cg is not None and cg.oom_kills():
            emit("stderr", f"tlimage: {oom_message(memory_mb)}\n".encode())
        return code
    finally:
        if cg is not None:
            cg.kill_all()
            cg.remove()


def _run_step(spec: dict, secrets: bytes, emit: Output, timeout: float | None,
              on_timeout: Callable[[], BaseException]) -> int:  # fmt: skip
    status_r, status_w = os.pipe()
    secrets_r, secrets_w = os.pipe() if spec.get("mounts") else (-1, -1)
    parent, child = (socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                     if spec.get("attach") else (None, None))  # fmt: skip
    spec = {**spec, "mode": "step", "status_fd": status_w, "secrets_fd": secrets_r,
            "sock_fd": child.fileno() if child else -1, "ns_flags": _flags(spec),
            "idmap": idmap()}  # fmt: skip
    fds = ((status_w,) + ((secrets_r,) if secrets_r >= 0 else ())
           + ((child.fileno(),) if child else ()))  # fmt: skip
    try:
        if parent:
            parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        proc = _spawn(spec, unshare=CLONE_NEWNS, die_with_parent=True,
                      cgroup_procs=spec.get("cgroup_procs", []), pass_fds=fds,
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    except BaseException:
        for fd in (status_r, status_w, secrets_r, secrets_w):
            if fd >= 0:
                os.close(fd)
        for sk in (parent, child):
            if sk:
                sk.close()
        raise
    for fd in (status_w, secrets_r):
        if fd >= 0:
            os.close(fd)
    if child:
        child.close()
    if secrets_w >= 0:
        spawner.write_and_close(secrets_w, secrets)
    deadline = None if timeout is None else time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    net = None
    try:
        if parent:
            wait = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
            text, pid = _recv(parent, wait)
            if text == "attach" and pid is not None:
                net = _give_network(parent, pid, spec)
            elif deadline is not None and time.monotonic() >= deadline:
                raise on_timeout()
            # else PID 1 failed before: its status pipe says why
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
        failure = read_all(status_r) or proc.error
    except BaseException:
        _kill(proc)
        raise
    finally:
        if net is not None:
            net.close()
        if parent:
            parent.close()
        sel.close()
        os.close(status_r)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    if failure:
        raise SandboxError(failure)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _kill(proc: spawner.Launched) -> None:
    """SIGKILL to the launcher's process group, PID 1 included (which takes the whole PID
    namespace down); PID 1 would also die with the launcher."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- a long-lived sandbox ------------------------------------------------------------------


def start_box(spec: dict, log: Path, timeout: float,
              unsafe: bool = False) -> tuple[int, Callable[[], None], dict | None]:  # fmt: skip
    """Starts the sandbox `spec` describes (see _init.main_box) detached from this process;
    returns (host pid of its PID 1, confirm, the network helper's record or None). The
    sandbox waits (up to a minute) for `confirm()` and ends itself without it, so a caller
    that dies between start and recording the pid leaks nothing; its network helper ends with
    its PID 1. Raises SandboxError with the sandbox's reason when it failed."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The helper ends when this pipe's write end, held by PID 1 only, closes.
    exit_r, exit_w = os.pipe2(os.O_CLOEXEC) if spec.get("attach") else (-1, -1)
    pid = None
    net = None
    try:
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        spec = {**spec, "mode": "box", "sock_fd": child.fileno(), "seccomp": _seccomp(unsafe),
                "ns_flags": _flags(spec), "idmap": idmap()}  # fmt: skip
        fds = (child.fileno(),) + ((exit_w,) if exit_w >= 0 else ())
        with open(log, "ab") as out:
            proc = _spawn(spec, unshare=CLONE_NEWNS,
                          cgroup_procs=spec.get("cgroup_procs", []), pass_fds=fds,
                          stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                          start_new_session=True)  # fmt: skip
        child.close()
        if exit_w >= 0:
            os.close(exit_w)
            exit_w = -1
        # The launcher forks PID 1, leaves it to the host's init and exits; when it failed
        # first, the socket's other end closes and its reason is the spawner's.
        text, pid = _recv(parent, timeout)
        if text == "attach" and pid is not None:
            net = _give_network(parent, pid, spec, exit_fd=exit_r)
            text, pid = _recv(parent, timeout)
        proc.wait()
        if proc.error:
            raise SandboxError(proc.error)
        if text != "ready" or pid is None:
            raise SandboxError(text.removeprefix("error: ") if text else _log_tail(log))
    except BaseException:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if net is not None:
            net.close()
        with contextlib.suppress(OSError):
            child.close()
        parent.close()
        raise
    finally:
        for fd in (exit_r, exit_w):
            if fd >= 0:
                os.close(fd)

    def confirm() -> None:
        try:
            parent.send(b"go")
        finally:
            parent.close()

    return pid, confirm, (net.record() if net is not None else None)


def _log_tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").strip().splitlines()
        if lines:
            return "\n".join("  | " + line for line in lines[-10:])
    return "the sandbox process exited without saying why"


def enter(init: list[int], spec: dict, *, pass_fds: tuple[int, ...] = (),
          **popen: object) -> subprocess.Popen:  # fmt: skip
    """Starts `_enter.py` with `spec` in the running sandbox whose PID 1 is `init` ([host pid,
    start time]; see _enter.main): it imports what it needs, then joins the sandbox's
    namespaces and cgroups."""
    try:
        seccomp = harden.seccomp_bpf().hex()
    except harden.Unavailable:
        seccomp = ""  # the sandbox was started without it, by the user's choice
    return _launch(
        "_enter", {**spec, "init": list(init), "seccomp": seccomp}, pass_fds=pass_fds, **popen
    )
