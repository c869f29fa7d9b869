"""QEMU's machine protocol (QMP) over its unix socket: the few commands tlimage sends (quit,
query-kvm, stop/cont, migrate) and the wait for a migration, either side."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

from tlimage.errors import ExecutorError


class QMP:
    """A QMP client that skips events. With a `deadline` (time.monotonic()) it waits for the
    monitor socket to open and for each reply as long as the deadline allows; without one the
    socket must be open now and replies get 5 s. Failures are raised as `error`."""

    error: type[Exception] = ExecutorError

    def __init__(self, path: str | Path, deadline: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if deadline is None:
                    raise
                if time.monotonic() > deadline:
                    raise self.error(f"QEMU's monitor socket {path} did not open") from None
                time.sleep(0.005)
        self.sock.settimeout(5 if deadline is None else max(1.0, deadline - time.monotonic()))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QEMU closed its monitor")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name: str, **args) -> dict:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise self.error(f"QMP {name}: {reply['error'].get('desc')}")
        return reply.get("return", {})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def wait_migration(qmp: QMP, deadline: float) -> None:
    """Polls until a migration (either side) completed. The incoming side answers `{}` until the
    stream starts, so no status is not an end."""
    delay = 0.001
    while True:
        st = qmp.command("query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise qmp.error(f"migration {status}: {st.get('error-desc', 'no detail')}")
        if time.monotonic() > deadline:
            raise qmp.error(f"migration did not finish in time (status {status})")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
