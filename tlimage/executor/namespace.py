"""Namespace executor: no VM. The step runs in a namespace sandbox (tlimage.sandbox: mount,
PID, UTS, IPC, and network unless the step has network) on an overlayfs of the lower layers;
this module turns a RunRequest into the sandbox's spec and its upper into a RunResult.

Needs root and a host filesystem under `upper_dir` that supports trusted.* xattrs (ext4, xfs,
btrfs, tmpfs). RUN mounts are made by the sandbox's PID 1 in its private mount namespace;
secrets reach it through a pipe, so their bytes are never in an argv, an environment of this
process or a file on disk.
"""

from __future__ import annotations

import shlex
import shutil
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
from tlimage.sandbox import namespace as isolation
from tlimage.sandbox.cgroup import DEFAULT_PIDS

HOSTNAME = "tlimage-build"


def check_host() -> str | None:
    """None when this host can run the namespace executor, else the reason it cannot."""
    return isolation.check_host()


class NamespaceExecutor:
    name = "namespace"

    def __init__(self, *, unsafe: bool = False, memory_mb: int | None = None,
                 pids: int | None = None) -> None:  # fmt: skip
        """`unsafe`: run even where the host lacks a layer of isolation (the caller said
        which). Limits per step: `memory_mb` (default $TLIMAGE_STEP_MEMORY_MB, else none) and
        `pids` (default $TLIMAGE_STEP_PIDS, else 4096)."""
        reason = check_host()
        if reason:
            raise ExecutorError(reason)
        self.unsafe = unsafe
        if not unsafe:
            lack = isolation.missing_layers()
            if lack:
                raise ExecutorError("this host cannot isolate build steps in namespaces fully: "
                                    + "; ".join(lack)
                                    + " (use --isolation namespace-unsafe to run anyway)")  # fmt: skip
        self.memory_mb = memory_mb or _env_int("TLIMAGE_STEP_MEMORY_MB")
        self.pids = pids or _env_int("TLIMAGE_STEP_PIDS") or DEFAULT_PIDS

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
                **isolation.root_spec(
                    req.lowers,
                    upper,
                    scratch / "work",
                    scratch / "merged",
                    network=req.network,
                    hostname=HOSTNAME,
                    files_dir=scratch,
                ),
                "argv": list(req.argv),
                "env": req.env_list(),
                "user": req.user,
                "workdir": req.workdir,
                "scratch": str(scratch),
                "mounts": _mount_specs(req),
            }
            secrets = b"".join(m.data for m in _ordered(req) if m.kind == "secret")
            try:
                code = isolation.run_step(
                    spec,
                    secrets=secrets,
                    emit=emit,
                    timeout=req.timeout,
                    on_timeout=lambda: StepTimeout(
                        f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}"
                    ),
                    unsafe=self.unsafe,
                    memory_mb=self.memory_mb,
                    pids=self.pids,
                )
            except isolation.SandboxError as e:
                raise ExecutorError(f"step could not start: {e}") from None
            opaque = normalize_upper(upper, req.lowers)
            ok = True
            return RunResult(code, upper, time.monotonic() - start, opaque)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if not ok:
                shutil.rmtree(upper, ignore_errors=True)

    def close(self) -> None:
        pass


def _env_int(name: str) -> int | None:
    import os

    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ExecutorError(f"${name} must be a positive whole number, got {value!r}")
    return int(value)


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
