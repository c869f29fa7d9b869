"""The namespace backend: a sandbox is a process tree in its own PID, mount, UTS and IPC
namespaces (and network, when it has none) on an overlayfs root, with no daemon. The isolation
itself (launch, PID 1, exec helper, cgroups) is tlimage.sandbox's; this module keeps sandboxes
alive and records their state.

    launcher (sandbox/_init.py, forked by the spawner into new namespaces)   forks PID 1, exits
      └─ PID 1 (`pids["init"]`, child of the host's init)  mounts, entrypoint, watchdog, reaper
    tlimage-enter (sandbox/_enter.py: setns into the sandbox)   exec, cp in, cp out

The launcher's exit makes the tree nobody's child: it survives the CLI and a crash of it, and no tlimage
process must reap it. Files: `<sandbox dir>/fs/{upper,work,merged}`; `merged` is mounted only
inside the sandbox's mount namespace, so nothing is mounted on the host and nothing can be left
mounted there: the kernel drops the mounts with the namespace's last process.

Suspend freezes the cgroup (or SIGSTOPs every process); memory stays in RAM, so a suspended
namespace sandbox does not survive a host reboot.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tlimage._fs import write_atomic
from tlimage.errors import RuntimeError_
from tlimage.runtime._errors import ExecStartError, ExecTimeout
from tlimage.runtime._state import SandboxRecord
from tlimage.sandbox import namespace as isolation
from tlimage.sandbox import proc as _proc
from tlimage.sandbox.cgroup import Cgroup

START_TIMEOUT = 30.0

Output = Callable[[str, bytes], None]
Launch = Callable[..., subprocess.Popen]  # Popen's keyword arguments -> the started helper


def check_host() -> str | None:
    return isolation.check_host()


def _with_secrets(entrypoint: dict[str, Any] | None) -> dict[str, Any] | None:
    from tlimage.sandbox.backend import entrypoint_env

    if entrypoint is None:
        return None
    plain = {k: v for k, v in entrypoint.items() if k != "secret_env"}
    return {**plain, "env": entrypoint_env(entrypoint)}


def fs_dir(rec: SandboxRecord) -> Path:
    return rec.path / "fs"


class NamespaceBackend:
    name = "namespace"

    # -- start ----------------------------------------------------------------------------

    def start(self, rec: SandboxRecord, lowers: list[Path],
              entrypoint: dict[str, Any] | None) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts the sandbox; returns (pids, extra, confirm). The sandbox waits (up to a
        minute) for `confirm()` and ends itself without it, so a caller that dies between
        start and recording the pids leaks nothing."""
        problem = check_host()
        if problem:
            raise RuntimeError_(f"cannot start a namespace sandbox: {problem}")
        fs = fs_dir(rec)
        for d in ("upper", "work", "merged"):
            (fs / d).mkdir(parents=True, exist_ok=True)
        cg, notes = Cgroup.create(rec.id, rec.cpus, rec.memory_mb)
        extra: dict[str, Any] = {"cgroup": cg.to_json() if cg else None, "notes": notes}
        spec = {
            **isolation.root_spec(
                lowers,
                fs / "upper",
                fs / "work",
                fs / "merged",
                network=rec.network,
                hostname=rec.name or rec.id,
                files_dir=rec.path,
            ),
            "id": rec.id,
            "network_policy": rec.extra.get("network_policy"),
            # on a pipe to PID 1, secrets included (never written anywhere)
            "entrypoint": _with_secrets(entrypoint),
            # PID 1 keeps a descriptor of it and reads `deadline`, writes `exit.json` and
            # `placeholders.json` there.
            "state_dir": str(rec.path),
            "cgroup_procs": cg.procs_files() if cg else [],
        }
        try:
            pid, confirm, net = isolation.start_box(
                spec, rec.path / "console.log", START_TIMEOUT, unsafe=bool(rec.extra.get("unsafe"))
            )
        except (isolation.SandboxError, OSError, subprocess.CalledProcessError) as e:
            if cg:
                cg.kill_all()
                cg.remove()
            raise RuntimeError_(f"the namespace sandbox failed to start: {e}") from None
        except BaseException:
            if cg:
                cg.kill_all()
                cg.remove()
            raise
        init = _proc.ident(pid)
        pids = {"init": init}
        extra["pidns"] = _proc.pid_ns(pid)
        extra["net"] = net
        return pids, extra, confirm

    # -- liveness and teardown ------------------------------------------------------------

    def alive(self, rec: SandboxRecord) -> bool:
        return _proc.alive(rec.pids.get("init"))

    def stop(self, rec: SandboxRecord) -> None:
        """Kills every process of the sandbox and waits for them; idempotent."""
        init = rec.pids.get("init")
        unshare = rec.pids.get("unshare")  # recorded by versions that started it
        # SIGKILL to a PID namespace's init (delivered even from outside) takes down every
        # process in the namespace; the cgroup and the pid-namespace scan catch anything that
        # was already on its way in (an exec helper between setns and fork).
        _proc.signal_entry(init, signal.SIGKILL)
        _proc.signal_entry(unshare, signal.SIGKILL)
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        if cg:
            cg.kill_all()
        ns = rec.extra.get("pidns")
        if ns and rec.boot_id == _proc.boot_id():
            _proc.kill_tree_ns(ns, signal.SIGKILL)
            _proc.kill_tree_ns(ns, signal.SIGCONT)
        _proc.wait_dead([init, unshare], 10)
        if rec.extra.get("net"):  # it ends with PID 1; this makes sure and waits for it
            from tlimage.sandbox.network import NetHandle

            with contextlib.suppress(Exception):
                NetHandle.adopt(rec.extra["net"]).close()

    def cleanup(self, rec: SandboxRecord, keep_fs: bool) -> None:
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        if cg:
            cg.remove()
        fs = fs_dir(rec)
        shutil.rmtree(fs / "work", ignore_errors=True)
        shutil.rmtree(fs / "merged", ignore_errors=True)
        if not keep_fs:
            shutil.rmtree(fs, ignore_errors=True)

    def exit_info(self, rec: SandboxRecord) -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((rec.path / "exit.json").read_text())
        return None

    # -- freezing -------------------------------------------------------------------------

    def freeze(self, rec: SandboxRecord) -> None:
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        if cg and cg.can_freeze:
            cg.freeze()
            return
        ns = rec.extra.get("pidns")
        if not ns:
            raise RuntimeError_(f"sandbox {rec.id} has no process namespace on record")
        # Stop until a scan finds nothing running: a process may fork while we scan.
        for _ in range(50):
            pids = _proc.pids_in_ns(ns)
            running = [p for p in pids if _proc.proc_state(p) not in ("T", "t", "Z", "X", None)]
            if not running:
                return
            for p in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
            time.sleep(0.002)
        raise RuntimeError_(f"could not stop every process of sandbox {rec.id}")

    def thaw(self, rec: SandboxRecord) -> None:
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        if cg and cg.can_freeze:
            cg.thaw()
            return
        ns = rec.extra.get("pidns")
        if ns:
            _proc.kill_tree_ns(ns, signal.SIGCONT)

    def frozen(self, rec: SandboxRecord) -> bool:
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        if cg and cg.can_freeze:
            return cg.frozen()
        init = rec.pids.get("init")
        return bool(init) and _proc.proc_state(init[0]) in ("T", "t")

    # -- suspend --------------------------------------------------------------------------

    def suspend(self, rec: SandboxRecord) -> dict:
        self.freeze(rec)
        return {"memory_snapshot": False,
                "note": "the namespace backend cannot snapshot memory: the processes are frozen "
                        "in RAM, and a host reboot ends the sandbox"}  # fmt: skip

    def abort_suspend(self, rec: SandboxRecord) -> None:
        self.thaw(rec)

    def rollback_suspend(self, rec: SandboxRecord):  # noqa: ANN201 - Status
        from tlimage.runtime._state import Status

        return Status.SUSPENDED if self.frozen(rec) else Status.RUNNING

    def resume(self, rec: SandboxRecord, deadline: float | None) -> dict:
        self.set_deadline(rec, deadline)  # before the watchdog wakes
        self.thaw(rec)
        return {}

    def survives_reboot(self, rec: SandboxRecord) -> bool:
        return False

    def set_deadline(self, rec: SandboxRecord, deadline: float | None) -> None:
        # Read by the running PID 1 only, and a namespace sandbox does not outlive a reboot:
        # no fsync (two per create, ~6 ms each on a busy disk).
        write_atomic(rec.path / "deadline", "" if deadline is None else repr(deadline),
                     durable=False)  # fmt: skip

    # -- exec and copy --------------------------------------------------------------------

    def _enter(self, rec: SandboxRecord, spec: dict, status_w: int) -> Launch:
        init = rec.pids.get("init")
        if not _proc.alive(init):
            raise RuntimeError_(f"sandbox {rec.id} is not running (its init process is gone)")
        assert init is not None
        cg = Cgroup.from_json(rec.extra.get("cgroup"))
        spec = {**spec, "cgroup_procs": cg.procs_files() if cg else [], "status_fd": status_w}
        return functools.partial(isolation.enter, init, spec, pass_fds=(status_w,))

    def exec(
        self,
        rec: SandboxRecord,
        argv: list[str],
        env: list[str],
        user: str,
        workdir: str,
        *,
        stdin: bytes | int | None = None,
        on_output: Output | None = None,
        passthrough: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Runs argv in the sandbox; returns its exit code (128+N for signal N). With
        `passthrough` the program writes straight to this process's stdout and stderr (and
        reads its stdin when `stdin` is an fd); otherwise chunks go to `on_output`."""
        status_r, status_w = os.pipe()
        try:
            cmd = self._enter(rec, {"mode": "exec", "argv": argv, "env": env, "user": user,
                                    "workdir": workdir}, status_w)  # fmt: skip
            cg = Cgroup.from_json(rec.extra.get("cgroup"))
            ooms = cg.oom_kills() if cg else 0
            code = _spawn(cmd, status_r, status_w, stdin, on_output, passthrough, timeout, argv)
            if code == isolation.OOM_CODE and cg and cg.oom_kills() > ooms:
                msg = f"tlimage: {isolation.oom_message(rec.memory_mb)}\n"
                if passthrough:
                    sys.stderr.write(msg)
                    sys.stderr.flush()
                elif on_output:
                    on_output("stderr", msg.encode())
            return code
        finally:
            for fd in (status_r, status_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def exec_tty(self, rec: SandboxRecord, argv: list[str], env: list[str], user: str,
                 workdir: str, winsize: tuple[int, int]) -> tuple[int, Callable[[], int]]:  # fmt: skip
        """Starts argv on a pseudo-terminal of the sandbox; returns (the terminal's master
        fd, a function that waits for the program and returns its exit code or raises
        ExecStartError). The caller relays the master and closes it."""
        status_r, status_w = os.pipe()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = {
                "mode": "exec",
                "argv": argv,
                "env": env,
                "user": user,
                "workdir": workdir,
                "tty": True,
                "tty_sock_fd": child.fileno(),
                "winsize": list(winsize),
            }
            launch = self._enter(rec, spec, status_w)
            proc = launch(pass_fds=(status_w, child.fileno()), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            os.close(status_w)
            status_w = -1
            child.close()
            parent.settimeout(60)
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(parent, 16, 1)
            except (TimeoutError, OSError):
                fds = []
        finally:
            parent.close()
            child.close()
            if status_w >= 0:
                os.close(status_w)

        def finish() -> int:
            try:
                _, err = proc.communicate()
                failure = _read_all(status_r)
            finally:
                os.close(status_r)
            if failure:
                raise ExecStartError(failure)
            code = proc.returncode
            if not fds and code:
                raise ExecStartError(_last_line(err) or "no terminal came back from the sandbox")
            return code if code >= 0 else 128 - code

        if not fds:
            finish()
            raise ExecStartError("no terminal came back from the sandbox")
        return fds[0], finish

    def put(self, rec: SandboxRecord, src: Path, dest: str) -> str:
        """Copies a host file or directory into the sandbox (as `docker cp` does: into `dest`
        when it is a directory, else as `dest`); returns the path written."""
        status_r, status_w = os.pipe()
        try:
            cmd = self._enter(rec, {"mode": "put", "dest": dest, "name": src.name}, status_w)
            proc = cmd(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.close(status_w)
            assert proc.stdin is not None
            try:
                write_tar(src, proc.stdin)
            except BrokenPipeError:
                pass
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.stdin = None
            out, err = proc.communicate()
            failure = _read_all(status_r)
            if failure or proc.returncode != 0:
                raise RuntimeError_(f"cp into {rec.id}:{dest} failed: "
                                    f"{failure or _last_line(err)}")  # fmt: skip
            return json.loads(out)["path"]
        finally:
            for fd in (status_r, status_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def fs(self, rec: SandboxRecord, op: str, path: str, **args: Any) -> Any:
        """One file operation (`stat`, `list`, `mkdir`, `remove`) in the sandbox's root, as
        root, links resolved inside the root; returns its JSON result."""
        status_r, status_w = os.pipe()
        try:
            cmd = self._enter(rec, {"mode": "fs", "op": op, "path": path, **args}, status_w)
            proc = cmd(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.close(status_w)
            status_w = -1
            out, err = proc.communicate()
            failure = _read_all(status_r)
            if failure or proc.returncode != 0:
                raise RuntimeError_(f"{op} {rec.id}:{path} failed: "
                                    f"{failure or _last_line(err)}")  # fmt: skip
            return json.loads(out)
        finally:
            for fd in (status_r, status_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def get(self, rec: SandboxRecord, src: str, dest: Path) -> Path:
        """Copies a file or directory out of the sandbox to `dest` (into it when it is a
        directory); returns the host path written."""
        status_r, status_w = os.pipe()
        try:
            cmd = self._enter(rec, {"mode": "get", "src": src}, status_w)
            proc = cmd(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.close(status_w)
            assert proc.stdout is not None and proc.stderr is not None
            failure = _read_all(status_r)
            if failure:
                proc.communicate()
                raise RuntimeError_(f"cp from {rec.id}:{src} failed: {failure}")
            target = host_target(dest, Path(src.rstrip("/")).name or "root")
            try:
                read_tar(proc.stdout, target)
            finally:
                _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError_(f"cp from {rec.id}:{src} failed: {_last_line(err)}")
            return target
        finally:
            for fd in (status_r, status_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- snapshot -------------------------------------------------------------------------

    @contextlib.contextmanager
    def frozen_upper(self, rec: SandboxRecord, dest: Path, lowers: list[Path],
                     running: bool) -> Iterator[None]:  # fmt: skip
        """The sandbox's changes as an overlay-style upper at `dest` (which must not exist),
        without the placeholders the sandbox mounted host files on. Its files are hard links
        into the live upper, so a running sandbox stays frozen until the block ends (the
        caller writes the layer inside it)."""
        from tlimage.sandbox.upper import normalize_upper

        upper = fs_dir(rec) / "upper"
        skip: set[str] = set()
        with contextlib.suppress(OSError, ValueError):
            skip = set(json.loads((rec.path / "placeholders.json").read_text()))
        if running:
            self.freeze(rec)
        try:
            link_tree(upper, dest, skip)
            normalize_upper(dest, tuple(lowers))
            yield
        finally:
            if running:
                self.thaw(rec)


# --- helpers ---------------------------------------------------------------------------------


def _spawn(cmd: Launch, status_r: int, status_w: int, stdin: bytes | int | None,
           on_output: Output | None, passthrough: bool, timeout: float | None,
           argv: list[str]) -> int:  # fmt: skip
    emit = on_output or (lambda _s, _b: None)
    if isinstance(stdin, int):
        stdin_arg: Any = stdin
    elif stdin is None:
        stdin_arg = subprocess.DEVNULL
    else:
        stdin_arg = subprocess.PIPE
    out = None if passthrough else subprocess.PIPE
    proc = cmd(stdin=stdin_arg, stdout=out, stderr=out)
    os.close(status_w)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if isinstance(stdin, bytes):
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        if not passthrough:
            _pump(proc, emit, deadline, timeout, argv)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            proc.wait(left)
        except subprocess.TimeoutExpired:
            raise ExecTimeout(f"command timed out after {timeout:g} s: {_join(argv)}") from None
        failure = _read_all(status_r)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise
    finally:
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    if failure:
        raise ExecStartError(failure)
    code = proc.returncode
    return code if code >= 0 else 128 - code


def _pump(proc: subprocess.Popen, emit: Output, deadline: float | None,
          timeout: float | None, argv: list[str]) -> None:  # fmt: skip
    """Streams both pipes until the program exits, then takes what is already buffered: a
    background process that keeps the pipes open does not hold the exec (nor does it get
    its later output delivered)."""
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(proc.pid)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(pidfd, selectors.EVENT_READ, None)
        exited = False
        while len(sel.get_map()) > (0 if exited else 1):
            if exited:
                wait = 0.0
            else:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(wait)
            if not events:
                if exited:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise ExecTimeout(f"command timed out after {timeout:g} s: {_join(argv)}")
            for key, _ in events:
                if key.data is None:
                    sel.unregister(pidfd)
                    exited = True
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    emit(key.data, data)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
        os.close(pidfd)


def _join(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)


_read_all = isolation.read_all


def _last_line(err: bytes | None) -> str:
    lines = (err or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no error output"


def link_tree(src: Path, dest: Path, skip: set[str]) -> None:
    """A copy of `src` whose files are hard links (directories are new, with the same mode,
    owner, times and xattrs); relative paths in `skip` are left out."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dest if rel == "." else dest / rel
        out.mkdir()
        _copy_meta(dirpath, out)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            r = os.path.normpath(os.path.join(rel, name))
            if r in skip:
                continue
            s = os.path.join(dirpath, name)
            st = os.lstat(s)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.mknod(out / name, stat.S_IFCHR, 0)  # a whiteout: its own inode
            else:
                os.link(s, out / name, follow_symlinks=False)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    # times last: creating entries changed them
    for dirpath, _dirnames, _files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        st = os.lstat(dirpath)
        os.utime(dest if rel == "." else dest / rel, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_meta(src: str, dest: Path) -> None:
    st = os.lstat(src)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        for n in os.listxattr(src, follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.setxattr(dest, n, os.getxattr(src, n, follow_symlinks=False))


# --- cp archives: one top-level entry named "_" ----------------------------------------------


def write_tar(src: Path, out: IO[bytes], arcname: str = "_") -> None:
    """`src` (file, link or tree) as a tar stream with the top-level entry `arcname`, owned
    by root."""
    if not os.path.lexists(src):
        raise RuntimeError_(f"{src}: no such file or directory")

    def as_root(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.add(str(src), arcname=arcname, recursive=True, filter=as_root)


def host_target(dest: Path, name: str) -> Path:
    if dest.is_dir():
        return dest / name
    if not dest.parent.is_dir():
        raise RuntimeError_(f"{dest.parent}: no such directory")
    return dest


def read_tar(stream: IO[bytes], target: Path, top: str = "_") -> None:
    """Extracts a stream whose entries all sit under `top` as `target`, owned by the caller
    (`top` "." is the root of a sandbox). Archives from a sandbox are untrusted: they go through
    `tlimage._fs.Extractor` below `target`'s folder (every entry and link target resolved inside
    it, hard links only to entries of the same archive, nothing outside ever written), device
    nodes are skipped and set-id bits cleared."""
    from tlimage._fs import Extractor

    base = target.name
    folder = target.parent
    with (
        Extractor(
            folder,
            owner=(os.getuid(), os.getgid()),
            devices=False,
            setid=False,
            follow_links=False,
            error=RuntimeError_,
        ) as ex,
        tarfile.open(fileobj=stream, mode="r|") as tf,
    ):
        for m in tf:
            name = m.name.rstrip("/")
            if name != top and not name.startswith(top + "/"):
                raise RuntimeError_(f"unexpected entry {m.name!r} in the sandbox's archive")
            m = m.replace(name=base + name[len(top) :], deep=False)
            if m.islnk():
                link = m.linkname.rstrip("/")
                if not link.startswith(top + "/"):
                    raise RuntimeError_(f"hard link {m.name!r} of the sandbox's archive points "
                                        f"outside {target}")  # fmt: skip
                m = m.replace(linkname=base + link[len(top) :], deep=False)
            ex.add(tf, m)
        ex.finish()
