"""Background processes of a sandbox: `sb.spawn(...)`, `tl sbx spawn|ps|kill|logs|wait`.

Each spawned process gets a supervisor of its own (`_procsup`, detached from the caller, so it
outlives the CLI command that started it) that runs the command through the backend's exec
and keeps its output in one bounded ring file per stream:

    <sandbox dir>/procs/<n>/status.json      id, name, cmd, state, pid, exit code, times
                            stdout.ring      16-byte header (magic, offset of the first byte
                            stderr.ring      kept) + the last RING_CAP bytes at most

A ring is compacted by writing the kept half to a new file and renaming it over the old one,
so a reader always sees a whole header and content; readers follow by absolute offset. No
environment (so no secret) is written anywhere: it travels to the supervisor on a pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as _signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlimage.errors import RuntimeError_

if TYPE_CHECKING:
    from tlimage.runtime._api import Sandbox

RING_CAP = 1 << 20  # bytes kept per stream
_MAGIC = b"TLRING01"
_HEADER = struct.Struct("<8sQ")
STREAMS = ("stdout", "stderr")
START_TIMEOUT = 30.0


# --- ring files ------------------------------------------------------------------------------


class RingWriter:
    """Appends to a ring file, keeping at most `cap` bytes (older output is dropped)."""

    def __init__(self, path: Path, cap: int = RING_CAP) -> None:
        self.path, self.cap = path, cap
        self.base, self.size = 0, 0
        self._replace(b"")

    def _replace(self, content: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, self.base) + content)
        os.replace(tmp, self.path)
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open between appends
        self.size = len(content)

    def append(self, data: bytes) -> None:
        if self.size + len(data) <= self.cap:
            self._f.write(data)
            self._f.flush()
            self.size += len(data)
            return
        with open(self.path, "rb") as f:
            f.seek(_HEADER.size)
            content = f.read() + data
        keep = content[-(self.cap // 2) :]
        self.base += len(content) - len(keep)
        self._f.close()
        self._replace(keep)

    def close(self) -> None:
        self._f.close()


def ring_read(path: Path, pos: int) -> tuple[bytes, int]:
    """The bytes of the ring from absolute offset `pos` (or from the oldest kept byte when
    those were dropped), and the offset after them."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return b"", pos
    with f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return b"", pos
        magic, base = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise RuntimeError_(f"{path}: not a process output ring")
        start = max(pos, base)
        f.seek(_HEADER.size + start - base)
        data = f.read()
    return data, start + len(data)


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessStatus:
    id: int
    name: str | None
    cmd: list[str]
    state: str  # starting, running, exited, failed
    pid: int | None  # in the sandbox
    exit_code: int | None
    error: str | None
    started_at: float
    ended_at: float | None

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running")

    def to_json(self) -> dict[str, Any]:
        from tlimage.runtime._api import iso_time

        d = dict(self.__dict__)
        d["started_at"] = iso_time(self.started_at)
        d["ended_at"] = iso_time(self.ended_at)
        return d


def _procs_dir(sb: Sandbox) -> Path:
    return sb.record.path / "procs"


def parse_signal(sig: str | int) -> int:
    if isinstance(sig, int):
        return sig
    s = sig.strip().upper()
    if s.isdigit():
        return int(s)
    name = s if s.startswith("SIG") else "SIG" + s
    try:
        return int(_signal.Signals[name])
    except KeyError:
        raise RuntimeError_(
            f"unknown signal {sig!r}; use a name (TERM, KILL, INT, HUP, ...) or a number"
        ) from None


class Process:
    """A handle on one spawned process of a sandbox."""

    def __init__(self, sb: Sandbox, pid: int) -> None:
        self.sandbox = sb
        self.id = pid
        self.dir = _procs_dir(sb) / str(pid)
        if not (self.dir / "status.json").exists():
            raise RuntimeError_(f"sandbox {sb.id} has no process {pid}",
                                hint=f"list them with `tl sbx ps {sb.id}`")  # fmt: skip

    def __repr__(self) -> str:
        return f"Process({self.sandbox.id!r}, {self.id})"

    def _raw(self) -> dict[str, Any]:
        for _ in range(50):
            with contextlib.suppress(ValueError, FileNotFoundError):
                return json.loads((self.dir / "status.json").read_text())
            time.sleep(0.01)
        raise RuntimeError_(f"{self.dir / 'status.json'}: unreadable")

    def status(self) -> ProcessStatus:
        d = self._raw()
        if d["state"] in ("starting", "running") and not _supervisor_alive(d):
            d = {**d, "state": "exited" if d["state"] == "running" else "failed",
                 "error": d.get("error") or "its supervisor ended (the sandbox ended?)",
                 "ended_at": d.get("ended_at") or time.time()}  # fmt: skip
        return ProcessStatus(d["id"], d.get("name"), d["cmd"], d["state"], d.get("pid"),
                             d.get("exit_code"), d.get("error"), d["started_at"],
                             d.get("ended_at"))  # fmt: skip

    @property
    def pid(self) -> int | None:
        """The process id inside the sandbox."""
        return self.status().pid

    def signal(self, sig: str | int = _signal.SIGTERM) -> None:
        from tlimage.sandbox import proc as _proc

        signum = parse_signal(sig)
        d = self._raw()
        if d["state"] != "running":
            raise RuntimeError_(f"process {self.id} of sandbox {self.sandbox.id} is {d['state']}")
        if d.get("host_pid") is None and d.get("pid"):  # a guest process (the microVM)
            rec = self.sandbox._running("signal a process")
            be = self.sandbox._backend()
            if hasattr(be, "signal"):  # noqa: SIM102 - the fallback below says "ended"
                try:
                    be.signal(rec, d["pid"], signum)
                except RuntimeError_ as e:
                    raise RuntimeError_(f"process {self.id} of sandbox {self.sandbox.id}: "
                                        f"{e}") from None  # fmt: skip
                return
        if not _proc.signal_entry(d.get("host_pid"), signum):
            raise RuntimeError_(f"process {self.id} of sandbox {self.sandbox.id} has ended")

    def kill(self) -> None:
        self.signal(_signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits for the end; returns the exit code (128+N after signal N), or None when
        `timeout` passed first or the command could not start."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if not st.running:
                return st.exit_code
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def output(self, stream: str = "stdout") -> bytes:
        """What the ring holds now."""
        return ring_read(self.dir / f"{_stream(stream)}.ring", 0)[0]

    def follow(self, stream: str = "stdout", *, poll: float = 0.05) -> Iterator[bytes]:
        """Chunks of the stream from the oldest kept byte until the process has ended."""
        path = self.dir / f"{_stream(stream)}.ring"
        pos = 0
        while True:
            done = not self.status().running
            data, pos = ring_read(path, pos)
            if data:
                yield data
            elif done:
                return
            else:
                time.sleep(poll)

    @property
    def stdout(self) -> Iterator[bytes]:
        return self.follow("stdout")

    @property
    def stderr(self) -> Iterator[bytes]:
        return self.follow("stderr")


def _stream(s: str) -> str:
    if s not in STREAMS:
        raise RuntimeError_(f"unknown stream {s!r}; expected stdout or stderr")
    return s


def _supervisor_alive(d: dict[str, Any]) -> bool:
    from tlimage.sandbox import proc as _proc

    return _proc.alive(d.get("supervisor"))


def list_processes(sb: Sandbox) -> list[Process]:
    root = _procs_dir(sb)
    if not root.is_dir():
        return []
    ids = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    return [Process(sb, i) for i in ids if (root / str(i) / "status.json").exists()]


def spawn(sb: Sandbox, cmd: list[str], *, name: str | None, env: Any, workdir: str | None,
          user: str | None) -> Process:  # fmt: skip
    if not cmd:
        raise RuntimeError_("spawn needs a command")
    rec = sb._running("spawn a process")
    full_env, wd, who = sb._process_settings(rec, env, workdir, user)
    root = _procs_dir(sb)
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    while True:
        try:
            (root / str(n)).mkdir()
            break
        except FileExistsError:
            n += 1
    spec = {"sandbox": rec.id, "id": n, "name": name, "cmd": list(cmd), "env": full_env,
            "user": who, "workdir": wd, "dir": str(root / str(n))}  # fmt: skip
    spec_r, spec_w = os.pipe()
    ready_r, ready_w = os.pipe()
    spec["ready_fd"] = ready_w
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlimage.runtime._procsup", f"fd:{spec_r}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(root / str(n) / "supervisor.log", "ab"),  # noqa: SIM115
            pass_fds=(spec_r, ready_w), start_new_session=True,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )  # fmt: skip
        os.close(spec_r)
        spec_r = -1
        os.close(ready_w)
        ready_w = -1
        with os.fdopen(spec_w, "wb") as f:
            spec_w = -1
            f.write(json.dumps(spec).encode())
        proc.wait()  # the supervisor forks and its first process returns at once
        answer = _read_until_eof(ready_r, START_TIMEOUT).decode("utf-8", "replace")
    finally:
        for fd in (spec_r, spec_w, ready_r, ready_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    if answer.startswith("error: "):
        from tlimage.runtime._errors import ExecStartError

        raise ExecStartError(answer[len("error: ") :])
    if answer != "ok":
        raise RuntimeError_(f"process {n} of sandbox {rec.id} did not start: "
                            f"{answer or 'no answer from its supervisor'}")  # fmt: skip
    return Process(sb, n)


def _read_until_eof(fd: int, timeout: float) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        b = os.read(fd, 4096)
        if not b:
            break
        out += b
    return out.strip()


def _pythonpath() -> str:
    import tlimage

    here = str(Path(tlimage.__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + extra if extra else "")
