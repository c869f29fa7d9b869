"""A namespace sandbox's cgroup: CPU and memory limits, freezing, and finding every process.

cgroup v2 (unified at /sys/fs/cgroup): one folder `/sys/fs/cgroup/tlimage/<id>`, limits in
`cpu.max` and `memory.max`, freezing through `cgroup.freeze`. cgroup v1: one folder per
controller (`freezer`, `cpu`, `memory`) under `tlimage/<id>`. What the host lacks is reported
back as a note and not enforced; without any freezer, suspend falls back to SIGSTOP.

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


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroup:
    version: int  # 1 or 2
    dirs: dict[str, str] = field(default_factory=dict)  # controller ("" for v2) -> folder

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, sid: str, cpus: float, memory_mb: int) -> tuple[Cgroup | None, list[str]]:
        """The sandbox's cgroup with its limits, and notes on whatever could not be set."""
        if os.environ.get("TLIMAGE_CGROUPS") == "0":
            return None, ["cgroups are off (TLIMAGE_CGROUPS=0): CPU and memory limits are not "
                          "enforced; suspend stops processes with SIGSTOP"]  # fmt: skip
        if (ROOT / "cgroup.controllers").is_file():
            return cls._create_v2(sid, cpus, memory_mb)
        return cls._create_v1(sid, cpus, memory_mb)

    @classmethod
    def _create_v2(cls, sid: str, cpus: float, memory_mb: int) -> tuple[Cgroup | None, list[str]]:
        notes: list[str] = []
        parent = ROOT / PARENT
        try:
            parent.mkdir(exist_ok=True)
        except OSError as e:
            return None, [f"cannot create {parent} ({e.strerror}): limits and freezing are off"]
        for ctrl in ("cpu", "memory"):
            for folder in (ROOT, parent):
                with contextlib.suppress(OSError):
                    _write(folder / "cgroup.subtree_control", f"+{ctrl}")
        d = parent / sid
        d.mkdir(exist_ok=True)
        cg = cls(2, {"": str(d)})
        try:
            _write(d / "cpu.max", f"{max(1000, int(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        except OSError:
            notes.append("the cpu controller is not available: the CPU limit is not enforced")
        try:
            _write(d / "memory.max", str(memory_mb << 20))
        except OSError:
            notes.append("the memory controller is not available: the memory limit is not "
                         "enforced")  # fmt: skip
        return cg, notes

    @classmethod
    def _create_v1(cls, sid: str, cpus: float, memory_mb: int) -> tuple[Cgroup | None, list[str]]:
        notes: list[str] = []
        dirs: dict[str, str] = {}
        for ctrl, probe in (("freezer", "freezer.state"), ("cpu", "cpu.cfs_quota_us"),
                            ("memory", "memory.limit_in_bytes")):  # fmt: skip
            base = ROOT / ctrl
            if not (base / probe).exists() and not (base / "cgroup.procs").exists():
                continue
            d = base / PARENT / sid
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            dirs[ctrl] = str(d)
        if not dirs:
            return None, ["no cgroup controllers are available: CPU and memory limits are not "
                          "enforced; suspend stops processes with SIGSTOP"]  # fmt: skip
        cg = cls(1, dirs)
        try:
            d = Path(dirs["cpu"])
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(max(1000, int(cpus * CPU_PERIOD_US))))
        except (KeyError, OSError):
            notes.append("the cpu controller is not available: the CPU limit is not enforced")
        try:
            _write(Path(dirs["memory"]) / "memory.limit_in_bytes", str(memory_mb << 20))
        except (KeyError, OSError):
            notes.append("the memory controller is not available: the memory limit is not "
                         "enforced")  # fmt: skip
        if "freezer" not in dirs:
            notes.append("the freezer controller is not available: suspend stops processes "
                         "with SIGSTOP")  # fmt: skip
        return cg, notes

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
    for base in (ROOT / PARENT, *(ROOT / c / PARENT for c in ("freezer", "cpu", "memory"))):
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("sb-") and e.name not in live and e.is_dir():
                with contextlib.suppress(OSError):
                    if e.stat().st_mtime < older_than:
                        out.append(e.path)
    return out
