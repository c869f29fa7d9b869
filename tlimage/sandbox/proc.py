"""Processes as the runtime tracks them: a pid is only trusted with its start time (clock ticks
since boot, field 22 of /proc/PID/stat) and the boot id, so a recycled pid or a rebooted host
never makes a dead sandbox look alive."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    return [f.decode() for f in rest]  # rest[0] is field 3 (state)


def proc_start(pid: int) -> int | None:
    f = _stat_fields(pid)
    return None if f is None else int(f[19])


def proc_state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return None if f is None else f[0]


def ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return None if f is None else int(f[1])


def alive(entry: list[int] | tuple[int, int] | None) -> bool:
    """True when [pid, start] names a process that still runs (zombies are dead)."""
    if not entry:
        return False
    pid, start = entry[0], entry[1]
    f = _stat_fields(pid)
    return f is not None and int(f[19]) == start and f[0] not in ("Z", "X")


def ns_pids(pid: int) -> list[int]:
    """`pid` in each PID namespace it is in, the host's first (NSpid of /proc/PID/status);
    empty when it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def ident(pid: int) -> list[int] | None:
    start = proc_start(pid)
    return None if start is None else [pid, start]


def signal_entry(entry: list[int] | None, sig: int) -> bool:
    """Sends `sig` only if the entry still names the same process."""
    if not alive(entry):
        return False
    assert entry is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(entry[0], sig)
        return True
    return False


def wait_dead(entries: list[list[int] | None], timeout: float) -> bool:
    """Waits until none of the entries is alive; True if they all ended in time."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while any(alive(e) for e in entries):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pids_in_ns(ns: str) -> list[int]:
    """Host pids of every process whose pid namespace is `ns` (as readlink shows it)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    out.append(int(name))
            except OSError:
                continue
    return out


def kill_tree_ns(ns: str, sig: int = signal.SIGKILL) -> int:
    n = 0
    for pid in pids_in_ns(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            n += 1
    return n
