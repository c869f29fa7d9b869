"""The supervisor of one spawned process (see _procs): `python -m tlimage.runtime._procsup fd:N`.

Reads its spec from pipe N, forks away from the caller (whose first process returns at once),
runs the command through the sandbox backend's exec with the output going to the ring files,
and keeps `status.json` current: starting -> running (with the process's pid) -> exited (with
its exit code) or failed (it could not start). The caller learns "ok" or "error: ..." on the
ready pipe once the command runs or has failed to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tlimage._fs import write_atomic


def _write_status(d: Path, status: dict[str, Any]) -> None:
    write_atomic(d / "status.json", json.dumps(status), durable=False)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _ns_pid(pid: int) -> int | None:
    """`pid` as its own PID namespace numbers it."""
    from tlimage.sandbox import proc as _proc

    ids = _proc.ns_pids(pid)
    return ids[-1] if ids else None


def _program(timeout: float) -> int | None:
    """The host pid of the command once it has been exec'd: the child of our nsenter child
    whose command line is no longer the enter helper's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in _children(os.getpid()):
            for b in _children(a):
                try:
                    with open(f"/proc/{a}/cmdline", "rb") as f:
                        parent = f.read()
                    with open(f"/proc/{b}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                # Not nsenter's forked child before its exec, not the enter helper.
                if cmd and cmd != parent and b"_enter.py" not in cmd:
                    return b
        time.sleep(0.01)
    return None


def main() -> None:
    fd = int(sys.argv[1].removeprefix("fd:"))
    chunks = []
    while b := os.read(fd, 1 << 16):
        chunks.append(b)
    os.close(fd)
    spec = json.loads(b"".join(chunks))
    if os.fork() > 0:
        os._exit(0)  # the caller reaps this one; the child is adopted and runs on
    ready = spec.pop("ready_fd")
    answered = False

    def answer(text: str) -> None:
        nonlocal answered
        if not answered:
            answered = True
            with contextlib.suppress(OSError):
                os.write(ready, text.encode())
                os.close(ready)

    from tlimage.runtime._api import backend_for
    from tlimage.runtime._errors import ExecStartError
    from tlimage.runtime._procs import RingWriter
    from tlimage.runtime._state import StateDB
    from tlimage.sandbox import proc as _proc

    d = Path(spec["dir"])
    status: dict[str, Any] = {
        "id": spec["id"], "name": spec["name"], "cmd": spec["cmd"], "state": "starting",
        "pid": None, "host_pid": None, "exit_code": None, "error": None,
        "started_at": time.time(), "ended_at": None, "supervisor": _proc.ident(os.getpid()),
    }  # fmt: skip
    _write_status(d, status)
    rings = {s: RingWriter(d / f"{s}.ring") for s in ("stdout", "stderr")}
    lock = threading.Lock()

    def out(stream: str, data: bytes) -> None:
        with lock:
            rings[stream].append(data)

    def watch() -> None:
        host = _program(timeout=60)
        with lock:
            if host is not None and status["state"] == "starting":
                status.update(state="running", host_pid=_proc.ident(host), pid=_ns_pid(host))
                _write_status(d, status)
                answer("ok")

    def started(pid: int) -> None:
        """The backend names the program's pid inside the sandbox (the microVM's agent)."""
        with lock:
            if status["state"] == "starting":
                status.update(state="running", pid=pid)
                _write_status(d, status)
                answer("ok")

    try:
        rec = StateDB().get(spec["sandbox"])  # no reconcile: the caller just did it
        if rec is None:
            raise RuntimeError(f"sandbox {spec['sandbox']} was removed")
        be = backend_for(rec.backend)
        if hasattr(be, "exec_watched"):  # it says the pid itself, and signals by it
            code = be.exec_watched(rec, spec["cmd"], spec["env"], spec["user"], spec["workdir"],
                                   on_output=out, on_start=started)  # fmt: skip
        else:
            threading.Thread(target=watch, daemon=True).start()
            code = be.exec(rec, spec["cmd"], spec["env"], spec["user"], spec["workdir"],
                           on_output=out)  # fmt: skip
        with lock:
            status.update(state="exited", exit_code=code, ended_at=time.time())
    except ExecStartError as e:
        with lock:
            status.update(state="failed", error=str(e), ended_at=time.time())
            _write_status(d, status)  # before the answer: the caller may list it at once
        answer(f"error: {e}")
    except Exception as e:  # noqa: BLE001 - recorded for `ps`, then this process ends
        with lock:
            status.update(state="failed" if status["state"] == "starting" else "exited",
                          error=str(e) or type(e).__name__, ended_at=time.time())  # fmt: skip
            _write_status(d, status)
        answer(f"error: {e}")
    finally:
        with lock:
            for r in rings.values():
                r.close()
            _write_status(d, status)
        answer("ok")


if __name__ == "__main__":
    main()
