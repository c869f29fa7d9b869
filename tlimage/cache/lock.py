"""The cache lock: builds hold it shared, `prune` exclusively (fcntl.flock on `layers-v1/lock`).

A build never sees blobs vanish under it, and prune never deletes what a build is about to index.
The kernel drops a flock when its holder dies, so a killed build cannot wedge the cache.

Holders also leave a small note in `lock.holders/` (pid, mode, purpose, since) so a waiter can say
what it waits for: "waiting for the cache lock, held exclusively by pid 4242 (prune) for 3s".
Notes of dead processes are ignored and swept. Waiting polls (flock has no timeout) and gives up
after `timeout` seconds with `LockTimeout`, naming the holders.

Not reentrant across modes: a process holding the lock shared that asks for it exclusively waits
for itself and times out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tlimage._fs import flock_wait, write_atomic
from tlimage.errors import CacheError

DEFAULT_TIMEOUT_S = 300.0


class LockTimeout(CacheError):
    def __init__(self, path: Path, mode: str, timeout: float, holders: str) -> None:
        super().__init__(
            f"timed out after {timeout:g}s waiting for the {mode} cache lock {path}: {holders}",
            hint="wait for it to finish, or use another --cache-dir",
        )
        self.path = path
        self.mode = mode
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    mode: str  # "shared" or "exclusive"
    purpose: str
    since: float

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.since
        return f"pid {self.pid} ({self.purpose}, {self.mode}, for {age:.0f}s)"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CacheLock:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.holders_dir = self.path.with_name(self.path.name + ".holders")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.holders_dir.mkdir(exist_ok=True)

    def shared(
        self,
        *,
        purpose: str = "build",
        timeout: float = DEFAULT_TIMEOUT_S,
        on_wait: Callable[[str], None] | None = _stderr,
    ) -> contextlib.AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_SH, "shared", purpose, timeout, on_wait)

    def exclusive(
        self,
        *,
        purpose: str = "prune",
        timeout: float = DEFAULT_TIMEOUT_S,
        on_wait: Callable[[str], None] | None = _stderr,
    ) -> contextlib.AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_EX, "exclusive", purpose, timeout, on_wait)

    @contextlib.contextmanager
    def _hold(
        self,
        op: int,
        mode: str,
        purpose: str,
        timeout: float,
        on_wait: Callable[[str], None] | None,
    ) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        note: Path | None = None
        try:
            self._acquire(fd, op, mode, timeout, on_wait)
            note = self._leave_note(mode, purpose)
            yield
        finally:
            if note is not None:
                with contextlib.suppress(FileNotFoundError):
                    note.unlink()
            os.close(fd)  # releases the flock

    def _acquire(
        self,
        fd: int,
        op: int,
        mode: str,
        timeout: float,
        on_wait: Callable[[str], None] | None,
    ) -> None:
        def tell() -> None:
            if on_wait is not None:
                on_wait(f"waiting for the {mode} cache lock, held by {self.describe_holders()}")

        try:
            flock_wait(fd, timeout, tell, shared=op == fcntl.LOCK_SH)
        except TimeoutError:
            raise LockTimeout(self.path, mode, timeout, self.describe_holders()) from None

    def _leave_note(self, mode: str, purpose: str) -> Path:
        note = self.holders_dir / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        body = {"pid": os.getpid(), "mode": mode, "purpose": purpose, "since": time.time()}
        write_atomic(note, json.dumps(body), durable=False)
        return note

    def holders(self) -> list[Holder]:
        """Live holders from their notes (notes of dead processes are removed)."""
        from tlimage.cache.store import pid_alive

        out: list[Holder] = []
        try:
            entries = list(os.scandir(self.holders_dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):  # not a temp file
                continue
            try:
                body = json.loads(Path(entry.path).read_text())
                holder = Holder(int(body["pid"]), body["mode"], body["purpose"], body["since"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid_alive(holder.pid):
                out.append(holder)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return sorted(out, key=lambda h: h.since)

    def describe_holders(self) -> str:
        holders = self.holders()
        if not holders:
            return "another process (no holder notes found)"
        now = time.time()
        return ", ".join(h.describe(now) for h in holders)
