"""What the sandbox runtime asks of a backend (tlimage/runtime/_api.py is the caller).

Two backends implement it — the namespace sandbox and the microVM (tlimage/runtime/) — and
`fake.FakeBackend` does, in-process, for unit tests. A backend holds no state of its own: every
call gets the sandbox's record (`SandboxState`), re-read from the state database, and what a
backend must remember goes back through `start`'s `pids` and `extra` or into the sandbox folder.

Lifecycle, as `_api` drives it:

    set_deadline(None); start -> (pids, extra, confirm); set_deadline(d); confirm()
    alive / exit_info / survives_reboot        (reconcile)
    exec / put / get                           (while Running)
    frozen_upper(...)  as a context manager    (snapshot; thaw undoes an abandoned one)
    suspend -> changes; abort_suspend / rollback_suspend; resume(deadline) -> changes
    stop; cleanup(keep_fs)                     (terminate, or a failed start)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# (stream, bytes): stream is "stdout" or "stderr".
Output = Callable[[str, bytes], None]


class SandboxState(Protocol):
    """The parts of a sandbox's record a backend reads (runtime/_state.py: SandboxRecord)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def status(self) -> str: ...  # "Pending", "Running", "Suspended", ...
    @property
    def cpus(self) -> float: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def network(self) -> bool: ...
    @property
    def pids(self) -> dict[str, list[int]]: ...  # role -> [pid, start time]
    @property
    def extra(self) -> dict[str, Any]: ...  # what `start` returned as extra, and more
    @property
    def cache_dir(self) -> str | None: ...
    @property
    def persistent(self) -> bool: ...  # named: the filesystem outlives the sandbox
    @property
    def path(self) -> Path: ...  # the sandbox's folder (state, disks, logs)
    @property
    def run_path(self) -> Path: ...  # a short folder for unix sockets, cleared by a reboot


@runtime_checkable
class Backend(Protocol):
    name: str

    def start(self, rec: SandboxState, lowers: list[Path], entrypoint: dict[str, Any] | None
              ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts the sandbox on `lowers` (bottom first) and returns (pids, extra, confirm).
        It waits for `confirm()` and ends itself without it, so a caller that dies between
        start and recording the pids leaks nothing. `entrypoint`: argv, env, user, workdir."""
        ...

    def alive(self, rec: SandboxState) -> bool:
        """Whether its processes (or, when suspended, its saved state) still exist."""
        ...

    def survives_reboot(self, rec: SandboxState) -> bool: ...

    def stop(self, rec: SandboxState) -> None:
        """Kills what runs (TERM, then KILL). Idempotent."""
        ...

    def cleanup(self, rec: SandboxState, keep_fs: bool) -> None:
        """Removes what the sandbox left; its filesystem too unless `keep_fs`."""
        ...

    def exit_info(self, rec: SandboxState) -> dict | None:
        """{"reason", "exit_code", "at"} written when it ended by itself, else None."""
        ...

    def set_deadline(self, rec: SandboxState, deadline: float | None) -> None:
        """Wall-clock seconds after which the sandbox ends itself (None: never)."""
        ...

    def exec(self, rec: SandboxState, argv: list[str], env: list[str], user: str, workdir: str,
             *, stdin: bytes | int | None = None, on_output: Output | None = None,
             passthrough: bool = False, timeout: float | None = None) -> int:  # fmt: skip
        """Runs a command inside; returns its exit code. `stdin`: bytes, or a file descriptor
        to stream; `passthrough` writes output straight to this process's fds 1 and 2."""
        ...

    def put(self, rec: SandboxState, src: Path, dest: str) -> str:
        """Copies a host file or folder into the sandbox; returns the path it got there."""
        ...

    def get(self, rec: SandboxState, src: str, dest: Path) -> Path:
        """Copies a file or folder out of the sandbox; returns the host path it got."""
        ...

    def frozen_upper(self, rec: SandboxState, dest: Path, lowers: list[Path],
                     running: bool) -> AbstractContextManager[None]:  # fmt: skip
        """A context manager: the sandbox's changes as an overlay-style upper at `dest`, with
        its processes stopped for as long as the block runs (when `running`)."""
        ...

    def thaw(self, rec: SandboxState) -> None:
        """Undoes a freeze a crashed snapshot left behind. Harmless when not frozen."""
        ...

    def suspend(self, rec: SandboxState) -> dict:
        """Stops the sandbox keeping its state; returns {"memory_snapshot", "note", "changes"}
        (record fields to update)."""
        ...

    def abort_suspend(self, rec: SandboxState) -> None: ...

    def rollback_suspend(self, rec: SandboxState) -> str:
        """After an interrupted suspend: the status it is really in ("Suspended"/"Running")."""
        ...

    def resume(self, rec: SandboxState, deadline: float | None) -> dict:
        """Continues a suspended sandbox; returns record fields to update ({"pids": ...})."""
        ...


class TtyBackend(Backend, Protocol):
    """A backend that can also run a command on a pseudo-terminal (the API checks with
    `hasattr`; both runtime backends can)."""

    def exec_tty(self, rec: SandboxState, argv: list[str], env: list[str], user: str,
                 workdir: str, winsize: tuple[int, int]) -> tuple[int, Callable[[], int]]:  # fmt: skip
        """Starts argv on a pseudo-terminal; returns (the terminal's master fd, a function that
        waits for the program and returns its exit code). The caller relays and closes it."""
        ...


class ProcessBackend(Backend, Protocol):
    """A backend whose exec names the program's pid inside the sandbox and that signals by it
    (the microVM: its guest processes are out of the host's reach). A spawned process's
    supervisor (runtime/_procsup.py) uses these; the namespace backend's are found and
    signalled from the host."""

    def exec_watched(self, rec: SandboxState, argv: list[str], env: list[str], user: str,
                     workdir: str, *, on_output: Output,
                     on_start: Callable[[int], None]) -> int:  # fmt: skip
        """As exec, calling `on_start(pid)` once the program runs."""
        ...

    def signal(self, rec: SandboxState, pid: int, signum: int) -> None:
        """Sends `signum` to the sandbox's process `pid`."""
        ...


class MemoryBackend(Backend, Protocol):
    """A backend that can copy a running sandbox with its memory (the microVM)."""

    def clone_memory(self, src: SandboxState, dst: SandboxState
                     ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts `dst` as a copy of the running `src`, processes included; returns (pids,
        extra, confirm) as `start` does."""
        ...

    def save_memory(self, src: SandboxState, dest: Path) -> None:
        """Writes a restorable copy of the running `src` (devices, memory, disks) to `dest`."""
        ...

    def start_from_memory(self, dst: SandboxState, saved: Path | None = None
                          ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts `dst` from what `save_memory` wrote; returns what `start` does."""
        ...


def entrypoint_env(entrypoint: dict[str, Any]) -> list[str]:
    """The entrypoint's environment: its `env`, then its `secret_env` (the sandbox's secrets,
    which a backend hands to the sandbox without writing them anywhere)."""
    env: dict[str, str] = {}
    for item in [*entrypoint.get("env", []), *entrypoint.get("secret_env", [])]:
        k, _, v = item.partition("=")
        env[k] = v
    return [f"{k}={v}" for k, v in env.items()]


# Methods a backend may lack (the API asks `hasattr` first), and the protocol naming each.
OPTIONAL_METHODS = {
    "exec_tty": TtyBackend,
    "exec_watched": ProcessBackend,
    "signal": ProcessBackend,
    "clone_memory": MemoryBackend,
    "save_memory": MemoryBackend,
    "start_from_memory": MemoryBackend,
}

BACKEND_METHODS = tuple(sorted(
    n for n in Backend.__dict__ if not n.startswith("_") and callable(getattr(Backend, n))
))  # fmt: skip
