"""Sandboxes still running on this host, found from their processes rather than from records,
so that a runtime can tell which of them it has lost (the state folder was removed, or the
record was never written) and end them.

Whose sandbox a process is, is read from the process itself: a namespace sandbox's PID 1
(`tlimage-spawn ...`, the PID 1 of its PID namespace) keeps a descriptor of its sandbox folder
`<sandboxes root>/<id>` open for its whole life (it writes `exit.json` there), and a microVM's
shim has `<sandboxes root>/<id>/shim.json` on its command line. The kernel shows the folder's
path even once it is removed (`/proc/PID/fd/N -> PATH (deleted)`), so a sandbox belongs to the
sandboxes root that is the parent of that folder, and to no other: another state folder's
sandboxes are never reported for this one. The sandbox's cgroups are `tlimage/<id>` in each
hierarchy (sandbox/cgroup.py).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from tlimage.sandbox import proc as _proc
from tlimage.sandbox.cgroup import _V1_PROBE, PARENT, ROOT, Cgroup

SHIM_MODULE = "tlimage.sandbox.qemu.shim"
DELETED = " (deleted)"


@dataclass
class Stray:
    sandbox_id: str
    backend: str  # "namespace" or "microvm"
    folder: str  # the sandbox folder as its process holds it
    folder_exists: bool
    process: list[int]  # [pid, start] of PID 1 (namespace) or of the shim (microVM)
    cgroups: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"sandbox_id": self.sandbox_id, "backend": self.backend, "folder": self.folder,
                "folder_exists": self.folder_exists, "pid": self.process[0],
                "cgroups": self.cgroups}  # fmt: skip


def _roots(sandboxes_root: Path) -> set[str]:
    """The spellings of the root a process may show: as given and with links resolved."""
    raw = os.path.normpath(os.path.abspath(sandboxes_root))
    return {raw, os.path.realpath(raw)}


def _argv(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return []


def _is_pid1(pid: str) -> bool:
    """PID 1 of a PID namespace below the host's (NSpid: HOSTPID ... 1)."""
    ids = _proc.ns_pids(int(pid))
    return len(ids) > 1 and ids[-1] == 1


def _held_folder(pid: str, roots: set[str]) -> str | None:
    """The sandbox folder directly under one of `roots` that `pid` holds open, if any."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        path = target.removesuffix(DELETED)
        if os.path.dirname(path) in roots and os.path.basename(path).startswith("sb-"):
            return path
    return None


def cgroups_of(sandbox_id: str) -> list[str]:
    """The folders of the cgroup `tlimage/<sandbox_id>` in every hierarchy."""
    bases = [ROOT / PARENT, *(ROOT / c / PARENT for c in _V1_PROBE)]
    return [str(b / sandbox_id) for b in bases if (b / sandbox_id).is_dir()]


def find(sandboxes_root: Path) -> list[Stray]:
    """Every sandbox whose folder is (or was) directly under `sandboxes_root` and whose PID 1
    or shim still runs, with its cgroups."""
    roots = _roots(sandboxes_root)
    found: dict[str, Stray] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        argv = _argv(pid)
        if not argv:
            continue
        folder, backend = None, ""
        if argv[0] == b"tlimage-spawn" and _is_pid1(pid):
            folder, backend = _held_folder(pid, roots), "namespace"
        elif SHIM_MODULE.encode() in argv and argv[-1].endswith(b"/shim.json"):
            spec = os.path.dirname(os.fsdecode(argv[-1]))
            if os.path.dirname(spec) in roots:
                folder, backend = spec, "microvm"
        ident = _proc.ident(int(pid)) if folder else None
        if folder is None or ident is None or not _proc.alive(ident):
            continue
        sid = os.path.basename(folder)
        found[sid] = Stray(sid, backend, folder, os.path.isdir(folder), ident, cgroups_of(sid))
    return sorted(found.values(), key=lambda s: s.sandbox_id)


def end(stray: Stray, grace: float = 10.0) -> bool:
    """Ends a stray sandbox: a shim is asked first (SIGTERM: it ends its VM and network
    helper), PID 1 of a namespace sandbox is killed (its PID namespace goes with it); then
    every process left in its cgroups is killed and the cgroups removed. True if nothing of
    it is left."""
    entry = stray.process
    asked = stray.backend == "microvm" and _proc.signal_entry(entry, signal.SIGTERM)
    if not (asked and _proc.wait_dead([entry], grace)):
        _proc.signal_entry(entry, signal.SIGKILL)
    by_version: dict[int, dict[str, str]] = {}
    for d in stray.cgroups:
        p = Path(d)
        if p.parent.parent == ROOT:  # /sys/fs/cgroup/tlimage/<id>: v2
            by_version.setdefault(2, {})[""] = d
        else:  # /sys/fs/cgroup/<controller>/tlimage/<id>
            by_version.setdefault(1, {})[p.parent.parent.name] = d
    groups = [Cgroup(version, dirs) for version, dirs in by_version.items()]
    for cg in groups:
        cg.kill_all()  # and thaws: a frozen (suspended) sandbox's processes die only then
    gone = _proc.wait_dead([entry], grace)
    for cg in groups:
        gone = cg.remove() and gone
    return gone
