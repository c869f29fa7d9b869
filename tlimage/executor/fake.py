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
    cat PATH            -> PATH's bytes on stdout (mounts, then the upper, then the lowers);
                           exit 1 when missing
    printenv NAME       -> the variable's value and a newline (secrets exposed as env included)

Mounts (`RunRequest.mounts`) behave as the real backends make them behave: `write` under a
writable bind lands in its host folder (cache mounts persist), under a writable view or a tmpfs
it is discarded, under a read-only mount or a secret it fails with exit 1; nothing under a mount
target reaches the upper.

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
from tlimage.executor.base import HostMount, OutputCallback, RunRequest, RunResult, StepTimeout

Handler = Callable[[RunRequest, Path, OutputCallback], int]


def _rel(path: str) -> str:
    rel = os.path.normpath("/" + path).lstrip("/")
    if not rel:
        raise ExecutorError(f"fake executor: refusing to touch the root ({path!r})")
    return rel


def _mount_at(req: RunRequest, path: str) -> tuple[HostMount, str] | None:
    """The innermost mount whose target holds `path`, and the path below that target."""
    norm = os.path.normpath("/" + path.lstrip("/"))
    for m in reversed(req.sorted_mounts()):
        t = m.target.rstrip("/")
        if norm == t or norm.startswith(t + "/"):
            return m, norm[len(t) :].lstrip("/")
    return None


def _read(req: RunRequest, upper: Path, path: str) -> bytes | None:
    hit = _mount_at(req, path)
    if hit is not None:
        m, rel = hit
        if m.kind == "secret":
            return m.data if not rel else None
        if m.kind == "bind" and m.source is not None:
            p = m.source / rel if rel else m.source
            return p.read_bytes() if p.is_file() else None
        if m.kind == "view":
            sub = os.path.normpath(os.path.join("/", m.subpath, rel)).lstrip("/")
            return _read_stack(m.layers, sub)
        return None  # tmpfs: empty
    return _read_stack((*req.lowers, upper), _rel(path))


def _read_stack(layers: tuple[Path, ...], rel: str) -> bytes | None:
    for layer in reversed(layers):
        p = layer / rel if rel else layer
        if os.path.lexists(p):
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # a whiteout
            return p.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return None


def default_handler(req: RunRequest, upper: Path, emit: OutputCallback) -> int:
    argv = list(req.argv)
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh") and argv[1] == "-c":
        commands = [shlex.split(c) for c in argv[2].split(";") if c.strip()]
    else:
        commands = [argv]
    for cmd in commands:
        op, args = cmd[0], cmd[1:]
        if op == "echo":
            emit("stdout", (" ".join(args) + "\n").encode("utf-8", "surrogateescape"))
        elif op == "exit":
            return int(args[0]) if args else 0
        elif op == "fail":
            emit("stderr", (" ".join(args) + "\n").encode())
            return 1
        elif op == "cat":
            data = _read(req, upper, args[0])
            if data is None:
                emit("stderr", f"cat: {args[0]}: No such file or directory\n".encode())
                return 1
            emit("stdout", data)
        elif op == "printenv":
            env = dict(req.env)
            env.update({m.env: m.data.decode("utf-8", "surrogateescape")
                        for m in req.mounts if m.kind == "secret" and m.env})  # fmt: skip
            if args[0] not in env:
                return 1
            emit("stdout", (env[args[0]] + "\n").encode())
        elif op == "write" and (hit := _mount_at(req, args[0])) is not None:
            m, rel = hit
            if m.readonly or m.kind == "secret" or not rel:
                emit("stderr", f"write {args[0]}: Read-only file system\n".encode())
                return 1
            if m.kind == "bind" and m.source is not None:
                p = m.source / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(" ".join(args[1:]))
            # views and tmpfs: the write is discarded with the mount
        elif op == "write":
            p = upper / _rel(args[0])
            _mkdirs(upper, p.parent)
            p.write_text(" ".join(args[1:]))
            os.chmod(p, 0o644)
        elif op == "mkdir":
            _mkdirs(upper, upper / _rel(args[-1]))
        elif op == "rm":
            p = upper / _rel(args[-1])
            _mkdirs(upper, p.parent)
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


def _mkdirs(upper: Path, d: Path) -> None:
    """`mkdir -p` as a program under umask 022 (a sandbox's) makes it, whatever the test
    process's umask: the step's layer must not depend on it."""
    d.mkdir(parents=True, exist_ok=True)
    while d != upper and upper in d.parents:
        os.chmod(d, 0o755)
        d = d.parent


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
