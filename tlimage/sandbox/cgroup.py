"""A sandbox's or a build step's cgroup: CPU, memory and pids limits, device access,
freezing, finding every process, and telling an out-of-memory kill.

cgroup v2 (unified at /sys/fs/cgroup): one folder `/sys/fs/cgroup/tlimage/<id>`, limits in
`cpu.max`, `memory.max` and `pids.max`, freezing through `cgroup.freeze`. cgroup v1: one folder
per controller (`freezer`, `cpu`, `memory`, `pids`, `devices`) under `tlimage/<id>`; the
devices controller gets runc's allowlist (the usual character devices; mknod of anything, open
of nothing else). What the host lacks is reported back as a note and not enforced; without any
freezer, suspend falls back to SIGSTOP. `missing()` names the limits a host cannot enforce.

`TLIMAGE_CGROUPS=0` turns cgroups off (the SIGSTOP fallback is then what suspend uses).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "tlimage"
CPU_PERIOD_US = 100_000
DEFAULT_PIDS = 4096  # enough for any build; a fork bomb stops there
# runc's default allowlist (libcontainer/specconv AllowedDevices), after `a` is denied.
DEVICES_ALLOW = ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                 "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm",
                 "c 10:200 rwm")  # fmt: skip
LIMITS = ("cpu", "memory", "pids")
_V1_PROBE = {"freezer": "freezer.state", "cpu": "cpu.cfs_quota_us",
             "memory": "memory.limit_in_bytes", "pids": "cgroup.procs",
             "devices": "devices.allow"}  # fmt: skip


def missing() -> list[str]:
    """The limits (cpu, memory, pids) this host's cgroups cannot enforce, with the reason."""
    if os.environ.get("TLIMAGE_CGROUPS") == "0":
        return ["cgroups are off (TLIMAGE_CGROUPS=0): no CPU, memory or pids limit"]
    if (ROOT / "cgroup.controllers").is_file():
        try:
            have = set((ROOT / "cgroup.controllers").read_text().split())
        except OSError:
            have = set()
        lack = [c for c in LIMITS if c not in have]
    else:
        lack = [c for c in LIMITS if not (ROOT / c / _V1_PROBE[c]).exists()]
    return [f"the {c} cgroup controller is not available: no {c} limit" for c in lack]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroup:
    version: int  # 1 or 2
    dirs: dict[str, str] = field(default_factory=dict)  # controller ("" for v2) -> folder

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, sid: str, cpus: float | None, memory_mb: int | None,
               pids: int | None = DEFAULT_PIDS) -> tuple[Cgroup | None, list[str]]:  # fmt: skip
        """The cgroup `tlimage/<sid>` with its limits (None: no limit), and notes on whatever
        could not be set."""
        if os.environ.get("TLIMAGE_CGROUPS") == "0":
            return None, ["cgroups are off (TLIMAGE_CGROUPS=0): CPU, memory and pids limits "
                          "are not enforced; suspend stops processes with SIGSTOP"]  # fmt: skip
        if (ROOT / "cgroup.controllers").is_file():
            return cls._create_v2(sid, cpus, memory_mb, pids)
        return cls._create_v1(sid, cpus, memory_mb, pids)

    @classmethod
    def _create_v2(cls, sid: str, cpus: float | None, memory_mb: int | None,
                   pids: int | None) -> tuple[Cgroup | None, list[str]]:  # fmt: skip
        notes: list[str] = []
        parent = ROOT / PARENT
        try:
            parent.mkdir(exist_ok=True)
        except OSError as e:
            return None, [f"cannot create {parent} ({e.strerror}): limits and freezing are off"]
        for ctrl in LIMITS:
            for folder in (ROOT, parent):
                with contextlib.suppress(OSError):
                    _write(folder / "cgroup.subtree_control", f"+{ctrl}")
        d = parent / sid
        d.mkdir(exist_ok=True)
        cg = cls(2, {"": str(d)})
        for ctrl, file, value in (
            ("cpu", "cpu.max", cpus and f"{max(1000, int(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"),
            ("memory", "memory.max", memory_mb and str(memory_mb << 20)),
            ("memory", "memory.swap.max", memory_mb and "0"),
            ("pids", "pids.max", pids and str(pids)),
        ):
            if value is None or value == 0:
                continue
            try:
                _write(d / file, value)
            except OSError:
                if file != "memory.swap.max":  # absent without swap accounting
                    notes.append(f"the {ctrl} controller is not available: the {ctrl} limit "
                                 "is not enforced")  # fmt: skip
        return cg, notes

    @classmethod
    def _create_v1(cls, sid: str, cpus: float | None, memory_mb: int | None,
                   pids: int | None) -> tuple[Cgroup | None, list[str]]:  # fmt: skip
        notes: list[str] = []
        dirs: dict[str, str] = {}
        for ctrl, probe in _V1_PROBE.items():
            base = ROOT / ctrl
            if not (base / probe).exists():
                continue
            d = base / PARENT / sid
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            dirs[ctrl] = str(d)
        if not dirs:
            return None, ["no cgroup controllers are available: CPU, memory and pids limits "
                          "are not enforced; suspend stops processes with SIGSTOP"]  # fmt: skip
        cg = cls(1, dirs)
        try:
            if cpus:
                d = Path(dirs["cpu"])
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(max(1000, int(cpus * CPU_PERIOD_US))))
        except (KeyError, OSError):
            notes.append("the cpu controller is not available: the CPU limit is not enforced")
        try:
            if memory_mb:
                d = Path(dirs["memory"])
                _write(d / "memory.limit_in_bytes", str(memory_mb << 20))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(d / "memory.memsw.limit_in_bytes", str(memory_mb << 20))
        except (KeyError, OSError):
            notes.append("the memory controller is not available: the memory limit is not "
                         "enforced")  # fmt: skip
        try:
            if pids:
                _write(Path(dirs["pids"]) / "pids.max", str(pids))
        except (KeyError, OSError):
            notes.append("the pids controller is not available: the pids limit is not "
                         "enforced")  # fmt: skip
        if "devices" in dirs:
            with contextlib.suppress(OSError):
                d = Path(dirs["devices"])
                _write(d / "devices.deny", "a")
                for rule in DEVICES_ALLOW:
                    _write(d / "devices.allow", rule)
        if "freezer" not in dirs:
            notes.append("the freezer controller is not available: suspend stops processes "
                         "with SIGSTOP")  # fmt: skip
        return cg, notes

    def oom_kills(self) -> int:
        """How many processes the kernel killed for want of memory in this cgroup."""
        if self.version == 2:
            path, key = Path(self.dirs[""]) / "memory.events", "oom_kill"
        elif "memory" in self.dirs:
            path, key = Path(self.dirs["memory"]) / "memory.oom_control", "oom_kill"
        else:
            return 0
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    # -- state ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"version": self.version, "dirs": self.dirs}

    @classmethod
    def from_json(cls, obj: dict | None) -> Cgroup | None:
        if not obj:
            return None
        return cls(int(obj["version"]), dict(obj["dirs"]))

    def procs_files(self) -> list[str]:
        """What a process writes "0" to, to join the sandbox."""
        return [str(Path(d) / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files():
            with contextlib.suppress(OSError):
                out |= {int(x) for x in Path(f).read_text().split()}
        return out

    # -- freezing -------------------------------------------------------------------------

    @property
    def can_freeze(self) -> bool:
        return self.version == 2 or "freezer" in self.dirs

    def freeze(self, timeout: float = 10.0) -> None:
        if self.version == 2:
            d = Path(self.dirs[""])
            _write(d / "cgroup.freeze", "1")
            self._wait(lambda: "frozen 1" in (d / "cgroup.events").read_text(), timeout)
        else:
            d = Path(self.dirs["freezer"])
            _write(d / "freezer.state", "FROZEN")
            self._wait(lambda: (d / "freezer.state").read_text().strip() == "FROZEN", timeout)

    def thaw(self) -> None:
        if self.version == 2:
            _write(Path(self.dirs[""]) / "cgroup.freeze", "0")
        elif "freezer" in self.dirs:
            _write(Path(self.dirs["freezer"]) / "freezer.state", "THAWED")

    def frozen(self) -> bool:
        with contextlib.suppress(OSError, KeyError):
            if self.version == 2:
                return (Path(self.dirs[""]) / "cgroup.freeze").read_text().strip() == "1"
            return (Path(self.dirs["freezer"]) / "freezer.state").read_text().strip() != "THAWED"
        return False

    @staticmethod
    def _wait(done, timeout: float) -> None:  # noqa: ANN001 - a predicate
        from tlimage.errors import RuntimeError_

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError_(f"the sandbox's processes did not freeze within {timeout:g} s")
            time.sleep(0.002)

    # -- teardown -------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL to every process, then thaw: a frozen v1 task dies only once thawed."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.thaw()

    def remove(self, timeout: float = 5.0) -> bool:
        """Removes the folders once their processes are gone; False if some stayed."""
        deadline = time.monotonic() + timeout
        left = dict(self.dirs)
        while left:
            for key, d in list(left.items()):
                try:
                    os.rmdir(d)
                    del left[key]
                except FileNotFoundError:
                    del left[key]
                except OSError:
                    pass
            if not left or time.monotonic() > deadline:
                break
            self.kill_all()
            time.sleep(0.01)
        return not left


def stale_cgroups(live: set[str], older_than: float) -> list[str]:
    """Sandbox cgroup folders (any state folder's) not in `live` and created before
    `older_than`; removing one that still has processes fails, which keeps it."""
    out = []
    for base in (ROOT / PARENT, *(ROOT / c / PARENT for c in _V1_PROBE)):
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(("sb-", "step-")) and e.name not in live and e.is_dir():
                with contextlib.suppress(OSError):
                    if e.stat().st_mtime < older_than:
                        out.append(e.path)
    return out
