"""An in-process executor for unit tests: no VM, no namespaces, no root.

It records every request and "runs" a step by calling a handler that writes into the upper dir
(the step's changes) and returns an exit code. The default handler understands just enough to
make build tests meaningful without privileges:

    echo TEXT...        -> TEXT on stdout, exit 0
    exit N              -> exit N
    write PATH TEXT     -> file PATH (in the upper) with TEXT
    mkdir PATH          -> directory PATH in the upper
    rm PATH             -> a whiteout for PATH (a 0:0 char device when running as root, else a
                           `.wh.<name>` file: fakes run unprivileged)
    fail TEXT           -> TEXT on stderr, exit 1

Commands come from `argv` directly, or from `sh -c "a; b"` with `;`-separated commands.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tlimage.errors import ExecutorError
from tlimage.executor.base import OutputCallback, RunRequest, RunResult, StepTimeout

Handler = Callable[[RunRequest, Path, OutputCallback], int]


def _rel(path: str) -> str:
    rel = os.path.normpath("/" + path).lstrip("/")
    if not rel:
        raise ExecutorError(f"fake executor: refusing to touch the root ({path!r})")
    return rel


def default_handler(req: RunRequest, upper: Path, emit: OutputCallback) -> int:
    argv = list(req.argv)
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh") and argv[1] == "-c":
        commands = [shlex.split(c) for c in argv[2].split(";") if c.strip()]
    else:
        commands = [argv]
    for cmd in commands:
        op, args = cmd[0], cmd[1:]
        if op == "echo":
            emit("stdout", (" ".join(args) + "\n").encode())
        elif op == "exit":
            return int(args[0]) if args else 0
        elif op == "fail":
            emit("stderr", (" ".join(args) + "\n").encode())
            return 1
        elif op == "write":
            p = upper / _rel(args[0])
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(" ".join(args[1:]))
        elif op == "mkdir":
            (upper / _rel(args[-1])).mkdir(parents=True, exist_ok=True)
        elif op == "rm":
            p = upper / _rel(args[-1])
            p.parent.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.mknod(p, stat.S_IFCHR, 0)
            else:
                (p.parent / (".wh." + p.name)).touch()
        elif op in ("true", ":"):
            pass
        else:
            emit("stderr", f"fake executor: unknown command {op!r}\n".encode())
            return 127
    return 0


@dataclass
class FakeExecutor:
    """Records requests in `runs`; `handler` decides what a step does. `hang` makes every step
    exceed its timeout (to test timeout handling without sleeping)."""

    handler: Handler = default_handler
    name: str = "fake"
    hang: bool = False
    runs: list[RunRequest] = field(default_factory=list)
    closed: bool = False

    def run(self, req: RunRequest, on_output: OutputCallback | None = None) -> RunResult:
        if self.closed:
            raise ExecutorError("fake executor used after close()")
        self.runs.append(req)
        emit = on_output or (lambda _s, _b: None)
        start = time.monotonic()
        if req.upper_dir.exists():
            raise ExecutorError(f"upper dir already exists: {req.upper_dir}")
        req.upper_dir.mkdir()
        try:
            if self.hang and req.timeout is not None:
                raise StepTimeout(f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}")
            code = self.handler(req, req.upper_dir, emit)
        except BaseException:
            _rmtree(req.upper_dir)
            raise
        return RunResult(exit_code=code, upper=req.upper_dir, duration=time.monotonic() - start)

    def close(self) -> None:
        self.closed = True


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
