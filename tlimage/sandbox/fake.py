"""An in-process `Backend` for unit tests: nothing is isolated and nothing runs.

Its "sandbox" is a folder (`<sandbox>/fake-root`) that holds only what the sandbox changed:
`put` copies into it, `get` copies out of it, `frozen_upper` copies it as the upper. `exec`
calls `on_exec` (or answers 0) and records the call. What reconcile sees is set by the test:
`live` (ids whose processes run), `frozen` (ids a suspend left stopped), `survivors` (ids kept
across a reboot while suspended) and `exits` (id -> exit info). Every call is appended to
`calls` as (method, id).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tlimage.errors import RuntimeError_
from tlimage.sandbox.backend import Output, SandboxState


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.frozen: set[str] = set()
        self.survivors: set[str] = set()
        self.exits: dict[str, dict] = {}
        self.deadlines: dict[str, float | None] = {}
        self.calls: list[tuple[str, str]] = []
        self.on_exec: Callable[[list[str]], int] | None = None

    @staticmethod
    def root(rec: SandboxState) -> Path:
        return rec.path / "fake-root"

    def start(self, rec: SandboxState, lowers: list[Path], entrypoint: dict[str, Any] | None
              ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        self.calls.append(("start", rec.id))
        self.root(rec).mkdir(parents=True, exist_ok=True)
        self.live.add(rec.id)
        return {}, {"lowers": [str(p) for p in lowers]}, lambda: None

    def alive(self, rec: SandboxState) -> bool:
        return rec.id in self.live

    def survives_reboot(self, rec: SandboxState) -> bool:
        return rec.status == "Suspended" and rec.id in self.survivors

    def stop(self, rec: SandboxState) -> None:
        self.calls.append(("stop", rec.id))
        self.live.discard(rec.id)

    def cleanup(self, rec: SandboxState, keep_fs: bool) -> None:
        self.calls.append(("cleanup-keep" if keep_fs else "cleanup", rec.id))
        if not keep_fs:
            shutil.rmtree(self.root(rec), ignore_errors=True)

    def exit_info(self, rec: SandboxState) -> dict | None:
        return self.exits.get(rec.id)

    def set_deadline(self, rec: SandboxState, deadline: float | None) -> None:
        self.deadlines[rec.id] = deadline

    def exec(self, rec: SandboxState, argv: list[str], env: list[str], user: str, workdir: str,
             *, stdin: bytes | int | None = None, on_output: Output | None = None,
             passthrough: bool = False, timeout: float | None = None) -> int:  # fmt: skip
        self._running(rec)
        self.calls.append(("exec", rec.id))
        return self.on_exec(argv) if self.on_exec else 0

    def put(self, rec: SandboxState, src: Path, dest: str) -> str:
        self._running(rec)
        self.calls.append(("put", rec.id))
        target = self.root(rec) / dest.lstrip("/") / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
        return "/" + str(target.relative_to(self.root(rec)))

    def get(self, rec: SandboxState, src: str, dest: Path) -> Path:
        self._running(rec)
        self.calls.append(("get", rec.id))
        found = self.root(rec) / src.lstrip("/")
        if not found.exists():
            raise RuntimeError_(f"cp from {rec.id}:{src} failed: no such file or directory")
        target = dest / found.name if dest.is_dir() else dest
        if found.is_dir():
            shutil.copytree(found, target, symlinks=True)
        else:
            shutil.copy2(found, target)
        return target

    @contextlib.contextmanager
    def frozen_upper(self, rec: SandboxState, dest: Path, lowers: list[Path],
                     running: bool) -> Iterator[None]:  # fmt: skip
        self.calls.append(("freeze", rec.id))
        shutil.copytree(self.root(rec), dest, symlinks=True)
        try:
            yield
        finally:
            self.thaw(rec)

    def thaw(self, rec: SandboxState) -> None:
        self.calls.append(("thaw", rec.id))

    def suspend(self, rec: SandboxState) -> dict:
        self.calls.append(("suspend", rec.id))
        self.live.discard(rec.id)
        self.frozen.add(rec.id)
        return {"memory_snapshot": True, "note": None, "changes": {"pids": {}}}

    def abort_suspend(self, rec: SandboxState) -> None:
        self.calls.append(("abort_suspend", rec.id))
        self.frozen.discard(rec.id)
        self.live.add(rec.id)

    def rollback_suspend(self, rec: SandboxState) -> str:
        return "Suspended" if rec.id in self.frozen else "Running"

    def resume(self, rec: SandboxState, deadline: float | None) -> dict:
        self.calls.append(("resume", rec.id))
        self.frozen.discard(rec.id)
        self.live.add(rec.id)
        self.deadlines[rec.id] = deadline
        return {"pids": {}}

    def _running(self, rec: SandboxState) -> None:
        if rec.id not in self.live:
            raise RuntimeError_(f"sandbox {rec.id} is not running")
