"""Namespace executor: no VM. The step runs under `unshare` (mount, PID, UTS, IPC, and network
unless the step has network) in a chroot onto an overlayfs of the lower layers.

Isolation is weaker than the microVM's (one kernel, root inside is root outside for anything the
namespaces do not cover); it exists for hosts without usable KVM and for speed. Needs root and a
host filesystem under `upper_dir` that supports trusted.* xattrs (ext4, xfs, btrfs, tmpfs).

All mounts live in the sandbox's private mount namespace, so they disappear with its last
process; killing `unshare` (on timeout, Ctrl-C or a crash of this process) kills the sandbox's
PID 1 and with it every process of the step.

RUN mounts are made by the sandbox's PID 1 (`_nsinit.setup_mounts`) in the same private
namespace; secrets reach it through a pipe, so their bytes are never in an argv, an environment
of this process or a file on disk.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlimage.errors import ExecutorError
from tlimage.executor.base import (
    HostMount,
    OutputCallback,
    RunRequest,
    RunResult,
    StepTimeout,
    normalize_upper,
)
from tlimage.executor.provision import require_tool

_NSINIT = Path(__file__).with_name("_nsinit.py")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def check_host() -> str | None:
    """None when this host can run the namespace executor, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the namespace executor needs root (it mounts overlayfs and chroots)"
    if shutil.which("unshare") is None:
        return "`unshare` is not installed (apt-get install util-linux)"
    return None


class NamespaceExecutor:
    name = "namespace"

    def __init__(self) -> None:
        reason = check_host()
        if reason:
            raise ExecutorError(reason)
        self._unshare = require_tool("unshare", "to start namespace sandboxes")

    def run(self, req: RunRequest, on_output: OutputCallback | None = None) -> RunResult:
        start = time.monotonic()
        emit = on_output or (lambda _s, _b: None)
        for lower in req.lowers:
            if not lower.is_dir():
                raise ExecutorError(f"lower layer is not a directory: {lower}")
        upper = req.upper_dir
        if upper.exists():
            raise ExecutorError(f"upper dir already exists: {upper}")
        # work and merged must sit on the upper's filesystem (overlayfs requires it for work).
        scratch = Path(tempfile.mkdtemp(prefix=".tl-ns-", dir=upper.parent))
        ok = False
        try:
            upper.mkdir()
            (scratch / "work").mkdir()
            (scratch / "merged").mkdir()
            spec = {
                "lowers": [str(p.resolve()) for p in req.lowers],
                "upper": str(upper.resolve()),
                "work": str(scratch / "work"),
                "merged": str(scratch / "merged"),
                "argv": list(req.argv),
                "env": req.env_list(),
                "user": req.user,
                "workdir": req.workdir,
                "network": req.network,
                "scratch": str(scratch),
                "mounts": _mount_specs(req),
            }
            flags = ["--mount", "--pid", "--fork", "--uts", "--ipc", "--kill-child=SIGKILL"]
            if not req.network:
                flags.append("--net")
            secrets = b"".join(m.data for m in _ordered(req) if m.kind == "secret")
            code = self._spawn(flags, spec, req, emit, secrets)
            opaque = normalize_upper(upper, req.lowers)
            ok = True
            return RunResult(code, upper, time.monotonic() - start, opaque)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if not ok:
                shutil.rmtree(upper, ignore_errors=True)

    def _spawn(self, flags: list[str], spec: dict, req: RunRequest, emit: OutputCallback,
               secrets: bytes = b"") -> int:  # fmt: skip
        status_r, status_w = os.pipe()
        secrets_r, secrets_w = os.pipe() if spec["mounts"] else (-1, -1)
        spec = {**spec, "status_fd": status_w, "secrets_fd": secrets_r}
        cmd = [self._unshare, *flags, "--", sys.executable, "-I", "-S", str(_NSINIT),
               json.dumps(spec)]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,) if secrets_r < 0 else (status_w, secrets_r),
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except BaseException:
            for fd in (status_r, status_w, secrets_r, secrets_w):
                if fd >= 0:
                    os.close(fd)
            raise
        os.close(status_w)
        if secrets_r >= 0:
            os.close(secrets_r)
            _feed(secrets_w, secrets)
        deadline = None if req.timeout is None else time.monotonic() + req.timeout
        sel = selectors.DefaultSelector()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            while sel.get_map():
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = sel.select(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    raise StepTimeout(
                        f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}"
                    )
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
                raise StepTimeout(
                    f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}"
                ) from None
            failure = _read_all(status_r)
        except BaseException:
            _kill(proc)
            raise
        finally:
            sel.close()
            os.close(status_r)
            for f in (proc.stdout, proc.stderr):
                if f:
                    f.close()
        if failure:
            raise ExecutorError(f"step could not start: {failure}")
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode

    def close(self) -> None:
        pass


def _ordered(req: RunRequest) -> list[HostMount]:
    """The order the sandbox mounts in: file mounts parents first, then env-only secrets."""
    return [*req.sorted_mounts(), *(m for m in req.mounts if not m.target)]


def _mount_specs(req: RunRequest) -> list[dict]:
    out = []
    for m in _ordered(req):
        if m.kind == "bind" and m.source is not None and not m.source.exists():
            raise ExecutorError(f"mount source for {m.target} does not exist: {m.source}")
        for layer in m.layers:
            if not layer.is_dir():
                raise ExecutorError(f"layer of the mount at {m.target} is not a directory: "
                                    f"{layer}")  # fmt: skip
        out.append({
            "kind": m.kind, "target": m.target,
            "source": str(m.source.resolve()) if m.source is not None else None,
            "layers": [str(p.resolve()) for p in m.layers], "subpath": m.subpath,
            "readonly": m.readonly, "size": m.size, "env": m.env,
            "uid": m.uid, "gid": m.gid, "mode": m.mode, "len": len(m.data),
        })  # fmt: skip
    return out


def _feed(fd: int, data: bytes) -> None:
    """Write the secrets for the sandbox to read at start-up, then close the pipe. A sandbox
    that died first (EPIPE) reports its own failure on the status pipe."""
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks).decode("utf-8", "replace")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to unshare's process group; --kill-child takes the sandbox's PID 1 (and with it
    the whole PID namespace) down too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
