"""The sandbox API: `Sandbox` objects over the state database and two backends.

Every operation re-reads the sandbox's row, takes the sandbox's lock file for lifecycle changes
(so two CLI processes never interleave a suspend and a snapshot), and moves the status with a
compare-and-swap. A lock held by a live process marks an operation in progress; `reconcile`
treats a transitional status whose lock it can take as abandoned and rolls it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage import _layout
from tlimage._fs import flock_wait
from tlimage._paths import project_name, state_dir
from tlimage._private import private_dir
from tlimage.errors import RuntimeError_
from tlimage.runtime._bases import BaseImages
from tlimage.runtime._bases import current as current_bases
from tlimage.runtime._errors import SandboxNotFound
from tlimage.runtime._state import (
    LIVE,
    TRANSITIONAL,
    SandboxRecord,
    StateDB,
    Status,
    now,
    op_owner,
)
from tlimage.sandbox import proc as _proc
from tlimage.sandbox.backend import Backend

SANDBOXES = _layout.SANDBOXES.path
BACKENDS = ("auto", "microvm", "namespace", "namespace-unsafe")
DEFAULT_CPUS = 1.0
DEFAULT_MEMORY_MB = 512
LOCK_TIMEOUT = 120.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Output = Callable[[str, bytes], None]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class SuspendResult:
    seconds: float
    memory_snapshot: bool  # False: processes are frozen in RAM (namespace backend)
    note: str | None = None


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    name: str | None
    project: str
    status: str
    backend: str
    image: str
    image_id: str
    cpus: float
    memory_mb: int
    timeout: float | None
    entrypoint: list[str] | None
    created_at: float
    terminated_at: float | None
    reason: str | None
    exit_code: int | None
    persistent: bool
    source: str | None
    notes: list[str]
    dir: str
    secret_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The documented fields first (`sandbox_id`, `namespace` (the project), `status`,
        `image`, `resources`, `secret_names`, `timeout_secs`, `entrypoint`, `created_at`,
        `terminated_at`; times in ISO-8601 UTC), then the rest."""
        return {
            "sandbox_id": self.id, "namespace": self.project, "status": self.status,
            "image": self.image, "resources": {"cpus": self.cpus, "memory_mb": self.memory_mb},
            "secret_names": list(self.secret_names), "timeout_secs": self.timeout,
            "entrypoint": self.entrypoint, "created_at": iso_time(self.created_at),
            "terminated_at": iso_time(self.terminated_at), "name": self.name,
            "backend": self.backend, "image_id": self.image_id, "reason": self.reason,
            "exit_code": self.exit_code, "persistent": self.persistent, "source": self.source,
            "notes": list(self.notes), "dir": self.dir,
        }  # fmt: skip


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO-8601 UTC (`2026-01-02T03:04:05Z`)."""
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- paths and backends ----------------------------------------------------------------------


def sandboxes_root() -> Path:
    return state_dir() / SANDBOXES


def run_root() -> Path:
    """Short paths for unix sockets (limited to 107 bytes): /run/tlimage as root, else the
    user's runtime folder; cleared by a reboot, which is what sockets of dead VMs want."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/tlimage")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "tlimage" if xdg else Path(f"/tmp/tlimage-{os.getuid()}")


def backend_for(name: str) -> Backend:
    if name == "namespace":
        from tlimage.runtime.namespace import NamespaceBackend

        return NamespaceBackend()
    if name == "microvm":
        from tlimage.runtime.microvm import MicroVMBackend

        return MicroVMBackend()
    raise RuntimeError_(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")


def select_backend(backend: str, cache_dir: Path | None,
                   notice: Callable[[str], None] | None = None) -> tuple[str, str | None]:  # fmt: skip
    """(backend, accel): the builds' rule (tlimage.sandbox.select_isolation) — the microVM when
    KVM boots, else the namespace sandbox (said once per process), else the microVM under TCG."""
    if backend not in BACKENDS:
        raise RuntimeError_(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    from tlimage.sandbox import select_isolation
    from tlimage.sandbox.qemu.kvm import kvm_usable

    return select_isolation(backend, kvm_probe=lambda: kvm_usable(cache_dir), notice=notice)


# --- locks -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(rec: SandboxRecord, *, timeout: float = LOCK_TIMEOUT,
          what: str = "") -> Iterator[None]:  # fmt: skip
    rec.path.mkdir(parents=True, exist_ok=True)

    def tell() -> None:
        if what:
            print(f"tlimage: waiting for another operation on sandbox {rec.id} to {what}",
                  file=sys.stderr)  # fmt: skip

    try:
        fd = flock_wait(rec.path / "lock", timeout, tell)
    except TimeoutError:
        raise RuntimeError_(
            f"sandbox {rec.id} is busy with another operation (waited {timeout:g} s)"
        ) from None
    try:
        yield
    finally:
        os.close(fd)


def _insert(db: StateDB, rec: SandboxRecord) -> None:
    """Record a new sandbox; its folder goes when the record cannot be made."""
    try:
        db.insert(rec)
    except BaseException:
        shutil.rmtree(rec.path, ignore_errors=True)
        raise


def _try_lock(rec: SandboxRecord) -> int | None:
    """The lock's fd when free (the caller closes it), None when an operation holds it."""
    try:
        return flock_wait(rec.path / "lock", 0)
    except TimeoutError:
        return None
    except OSError:
        return -1  # no folder: nothing can hold it


# --- environment -----------------------------------------------------------------------------


def _secret_env(rec: SandboxRecord) -> list[str]:
    """The sandbox's secrets as KEY=VALUE, read from the store now (never stored with it)."""
    from tlimage.runtime._secrets import secret_env

    return list(secret_env(rec.extra.get("secret_names") or [], project=rec.project))


def _refuse_secrets_in_memory(rec: SandboxRecord, what: str, with_secrets: bool) -> None:
    """Secrets never reach a memory copy unless asked: a process's environment is in RAM."""
    names = rec.extra.get("secret_names") or []
    if names and not with_secrets:
        flag = "clone --memory" if what == "clone" else "snapshot --memory"
        raise RuntimeError_(
            f"sandbox {rec.name or rec.id} was created with secrets ({', '.join(names)}): its "
            f"memory holds their values, so a memory {what} would copy them",
            hint=f"tl sbx {flag} --with-secrets (Python: with_secrets=True) does it anyway; "
            f"without --memory only the filesystem is copied, and no secret with it",
        )


def merge_env(*layers: Sequence[str]) -> list[str]:
    """KEY=VALUE lists merged left to right (later wins, order of first appearance kept);
    PATH defaults to Docker's."""
    env: dict[str, str] = {}
    for layer in layers:
        for item in layer:
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise RuntimeError_(f"environment entry {item!r}: expected KEY=VALUE")
            env[k] = v
    if "PATH" not in env:
        env = {"PATH": DEFAULT_PATH, **env}
    return [f"{k}={v}" for k, v in env.items()]


# --- the API ---------------------------------------------------------------------------------


class Sandbox:
    """A handle on one sandbox. Cheap to make; every call re-reads the state."""

    def __init__(self, rec: SandboxRecord, db: StateDB | None = None) -> None:
        self._rec = rec
        self._db = db or StateDB()

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, name={self.name!r}, status={self.status!s})"

    # -- creation and lookup --------------------------------------------------------------

    @classmethod
    def create(
        cls,
        image: str | None = None,
        *,
        name: str | None = None,
        project: str | None = None,
        backend: str = "auto",
        cpus: float = DEFAULT_CPUS,
        memory: int = DEFAULT_MEMORY_MB,
        timeout: float | None = None,
        entrypoint: Sequence[str] | None = None,
        env: Sequence[str] | dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        network: bool = True,
        network_policy: Any = None,
        cache_dir: Path | None = None,
        secret_names: Sequence[str] | None = None,
        notice: Callable[[str], None] | None = None,
        bases: BaseImages | None = None,
        _source: str | None = None,
    ) -> Sandbox:
        """Boots a sandbox from the registered image `image` (NAME[:TAG]; a base of the
        catalog when no image of that name is registered; None: the default base) and returns
        once it runs. Without `entrypoint` it idles until terminated or timed out; with one, it
        ends when the entrypoint exits. `timeout` (seconds of running time) terminates it.
        Unnamed sandboxes are ephemeral: their filesystem goes when they end.
        `secret_names` (stored with `tl secrets set`) become environment variables of every
        exec and spawn; their values are read at each exec and never stored with the sandbox.
        `network_policy` (a `tlimage.sandbox.network.NetworkPolicy` or its JSON form) says what
        the sandbox may reach when it has network: mode allow|deny and block/allow lists,
        enforced outside it. `bases` is the base catalog (see runtime._bases; default: the
        one `use_bases` set, which `tlimage.Sandbox` sets to the builder's)."""
        from tlimage.registry import Registry
        from tlimage.runtime._secrets import check_secrets_exist

        reconcile()
        proj = project_name(project)
        if name is not None:
            _check_name(name)
        if cpus <= 0:
            raise RuntimeError_(f"cpus must be > 0, got {cpus:g}")
        if memory < 64:
            raise RuntimeError_(f"memory must be at least 64 MiB, got {memory}")
        if timeout is not None and timeout <= 0:
            raise RuntimeError_(f"timeout must be > 0 seconds, got {timeout:g}")
        if entrypoint is not None and not list(entrypoint):
            entrypoint = None
        if isinstance(secret_names, str):
            secret_names = [secret_names]
        secrets_ = check_secrets_exist(secret_names or [], project=proj)
        policy = _network_policy(network, network_policy)
        cache = str(Path(cache_dir).resolve()) if cache_dir else os.environ.get("TLIMAGE_CACHE_DIR")
        be_name, accel = select_backend(backend, Path(cache) if cache else None, notice)
        unsafe = be_name == "namespace-unsafe"
        be_name = "namespace" if unsafe else be_name
        img = _image_or_base(Registry(), proj, image, cache_dir, notice,
                             "auto" if backend == "auto" else be_name, bases)  # fmt: skip
        if not img.manifest.layers:
            raise RuntimeError_(f"image {img.ref} has no layers; nothing to boot")
        if img.manifest.config.get("labels", {}).get("org.tlimage.init") == "systemd":
            be_name, accel = _systemd_backend(img.ref, backend, be_name, accel, notice)
        if isinstance(env, dict):
            env = [f"{k}={v}" for k, v in env.items()]
        sandbox_env = list(env or [])
        merge_env(sandbox_env)  # validates
        cfg = img.manifest.config
        config = {"env": list(cfg.get("env", [])), "user": cfg.get("user") or "root",
                  "workdir": cfg.get("workdir") or "/"}  # fmt: skip

        sid = new_id()
        path = private_dir(sandboxes_root()) / sid
        private_dir(state_dir())
        path.mkdir(parents=True)
        run_dir = private_dir(run_root()) / sid
        rec = SandboxRecord(
            id=sid, project=proj, name=name, status=Status.PENDING, backend=be_name,
            image_ref=img.ref, image_id=img.image_id, cpus=float(cpus), memory_mb=int(memory),
            timeout=timeout, entrypoint=list(entrypoint) if entrypoint else None,
            env=sandbox_env, workdir=workdir, user=user, network=network, created_at=now(),
            started_at=None, terminated_at=None, deadline=None, suspended_at=None, reason=None,
            exit_code=None, pids={}, boot_id=_proc.boot_id(), dir=str(path),
            run_dir=str(run_dir), cache_dir=cache, source=_source,
            extra={"config": config, "image_config": dict(cfg), "accel": accel, "unsafe": unsafe,
                   "layers": [vars(la) for la in img.manifest.layers],
                   "secret_names": secrets_, "network_policy": policy},
            **op_owner(),
        )  # fmt: skip
        db = StateDB()
        with _lock(rec):
            _insert(db, rec)
            be = backend_for(be_name)

            def start() -> tuple[dict, dict, Callable[[], None]]:
                lowers = _lowers(rec)
                ep = None
                if entrypoint:
                    ep = {"argv": list(entrypoint),
                          "env": merge_env(config["env"], sandbox_env),
                          "secret_env": _secret_env(rec),
                          "user": user or config["user"],
                          "workdir": workdir or config["workdir"]}  # fmt: skip
                return be.start(rec, lowers, ep)

            rec = _boot(rec, db, be, start, keep_fs=False, reason="failed to start")
        return cls(rec, db)

    @classmethod
    def get(cls, ref: str, *, project: str | None = None) -> Sandbox:
        """By id, unique id prefix (at least 4 characters), or name in the project."""
        reconcile()
        db = StateDB()
        rec = db.get(ref)
        if rec is None and not ref.startswith("sb-"):
            rec = db.find_name(project_name(project), ref)
        if rec is None and len(ref) >= 4:
            hits = db.find_prefix(ref if ref.startswith("sb-") else "sb-" + ref)
            if len(hits) > 1:
                raise SandboxNotFound(f"{ref!r} matches {len(hits)} sandboxes: "
                                      f"{', '.join(h.id for h in hits)}")  # fmt: skip
            rec = hits[0] if hits else None
        if rec is None:
            raise SandboxNotFound(f"no sandbox {ref!r} in project {project_name(project)!r}",
                                  hint="list them with `tl sbx ls --all`")  # fmt: skip
        return cls(rec, db)

    # -- reading --------------------------------------------------------------------------

    def refresh(self) -> SandboxRecord:
        rec = self._db.get(self._rec.id)
        if rec is None:
            raise SandboxNotFound(f"sandbox {self._rec.id} was removed")
        self._rec = rec
        return rec

    @property
    def id(self) -> str:
        return self._rec.id

    @property
    def name(self) -> str | None:
        return self._rec.name

    @property
    def status(self) -> Status:
        return self.refresh().status

    @property
    def record(self) -> SandboxRecord:
        return self._rec

    def info(self) -> SandboxInfo:
        r = self.refresh()
        return SandboxInfo(
            id=r.id, name=r.name, project=r.project, status=str(r.status), backend=r.backend,
            image=r.image_ref, image_id=r.image_id, cpus=r.cpus, memory_mb=r.memory_mb,
            timeout=r.timeout, entrypoint=r.entrypoint, created_at=r.created_at,
            terminated_at=r.terminated_at, reason=r.reason, exit_code=r.exit_code,
            persistent=r.persistent, source=r.source, notes=list(r.extra.get("notes") or []),
            dir=r.dir, secret_names=list(r.extra.get("secret_names") or []),
        )  # fmt: skip

    @property
    def files(self):  # noqa: ANN201 - SandboxFiles
        """File operations: `sb.files.read/write/list/stat/mkdir/remove(path)`."""
        from tlimage.runtime._files import SandboxFiles

        return SandboxFiles(self)

    @property
    def secret_names(self) -> list[str]:
        return list(self._rec.extra.get("secret_names") or [])

    def _backend(self) -> Backend:
        return backend_for(self._rec.backend)

    def _running(self, what: str) -> SandboxRecord:
        rec = self.refresh()
        if rec.status is Status.RUNNING:
            return rec
        hint = {Status.SUSPENDED: f"resume it first: tl sbx resume {rec.name or rec.id}",
                Status.TERMINATED: "it has ended; start a new one with `tl sbx new`"}  # fmt: skip
        raise RuntimeError_(f"cannot {what}: sandbox {_label(rec)} is {rec.status}",
                            hint=hint.get(rec.status))  # fmt: skip

    # -- exec and copy --------------------------------------------------------------------

    def _env(self, rec: SandboxRecord, env: Sequence[str] | dict[str, str] | None) -> list[str]:
        """The image's env, the sandbox's, its secrets (read now), then this call's."""
        from tlimage.runtime._secrets import secret_env

        if isinstance(env, dict):
            env = [f"{k}={v}" for k, v in env.items()]
        cfg = rec.extra.get("config", {})
        names = rec.extra.get("secret_names") or []
        return merge_env(cfg.get("env", []), rec.env, secret_env(names, project=rec.project),
                         list(env or []))  # fmt: skip

    def _process_settings(self, rec: SandboxRecord, env: Sequence[str] | dict[str, str] | None,
                          workdir: str | None, user: str | None
                          ) -> tuple[list[str], str, str]:  # fmt: skip
        """(environment, working folder, user) of a command run in the sandbox: this call's,
        else the sandbox's, else the image's (env: all merged, see `_env`)."""
        cfg = rec.extra.get("config", {})
        wd = workdir or rec.workdir or cfg.get("workdir") or "/"
        if not wd.startswith("/"):
            raise RuntimeError_(f"workdir must be absolute, got {wd!r}")
        return self._env(rec, env), wd, user or rec.user or cfg.get("user") or "root"

    def exec(
        self,
        *cmd: str,
        env: Sequence[str] | dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bytes | int | None = None,
        on_output: Output | None = None,
        passthrough: bool = False,
    ) -> ExecResult:
        """Runs `cmd` in the sandbox with the image's env, workdir and user (each overridable).
        Output is collected in the result and passed to `on_output(stream, chunk)` as it
        arrives; with `passthrough` it goes straight to this process's stdout/stderr instead
        (and `stdin` may be a file descriptor). A program that cannot start raises
        ExecStartError; a non-zero exit is a result."""
        if not cmd:
            raise RuntimeError_("exec needs a command")
        rec = self._running("exec")
        full_env, wd, who = self._process_settings(rec, env, workdir, user)
        out: list[bytes] = []
        err: list[bytes] = []

        def collect(stream: str, data: bytes) -> None:
            (out if stream == "stdout" else err).append(data)
            if on_output:
                on_output(stream, data)

        t0 = time.monotonic()
        code = self._backend().exec(rec, list(cmd), full_env, who, wd, stdin=stdin,
                                    on_output=collect, passthrough=passthrough,
                                    timeout=timeout)  # fmt: skip
        return ExecResult(code, b"".join(out), b"".join(err), time.monotonic() - t0)

    def exec_tty(
        self,
        *cmd: str,
        env: Sequence[str] | dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        in_fd: int = 0,
        out_fd: int = 1,
    ) -> int:
        """Runs `cmd` on a pseudo-terminal of the sandbox relayed to the terminal on `in_fd`
        and `out_fd` (raw mode while it runs; window size and SIGWINCH forwarded; `TERM` from
        this process unless `env` sets it). Returns the exit code."""
        from tlimage.runtime._tty import relay, window_size

        if not cmd:
            raise RuntimeError_("exec needs a command")
        rec = self._running("exec")
        be = self._backend()
        if not hasattr(be, "exec_tty"):
            raise RuntimeError_(f"a terminal (-t) is not available on the {rec.backend} backend "
                                "yet; use exec -i")  # fmt: skip
        if isinstance(env, dict):
            env = [f"{k}={v}" for k, v in env.items()]
        term = [f"TERM={os.environ.get('TERM') or 'xterm'}"]
        full_env = self._env(rec, term + list(env or []))
        cfg = rec.extra.get("config", {})
        wd = workdir or rec.workdir or cfg.get("workdir") or "/"
        if not wd.startswith("/"):
            raise RuntimeError_(f"workdir must be absolute, got {wd!r}")
        who = user or rec.user or cfg.get("user") or "root"
        size = window_size(in_fd if os.isatty(in_fd) else out_fd)
        master, finish = be.exec_tty(rec, list(cmd), full_env, who, wd, size)
        return relay(master, finish, in_fd, out_fd)

    def spawn(
        self,
        *cmd: str,
        name: str | None = None,
        env: Sequence[str] | dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ):  # noqa: ANN201 - Process
        """Starts `cmd` in the background (image env, sandbox env and secrets as for exec)
        and returns a `Process` once it runs: `.pid`, `.status()`, `.signal()`, `.wait()`,
        `.stdout`/`.stderr` iterators. Its output is kept in a bounded ring per stream. A
        program that cannot start raises ExecStartError."""
        from tlimage.runtime._procs import spawn

        return spawn(self, list(cmd), name=name, env=env, workdir=workdir, user=user)

    def processes(self) -> list:
        """The processes spawned in this sandbox, oldest first (ended ones included)."""
        from tlimage.runtime._procs import list_processes

        return list_processes(self)

    def process(self, pid: int | str):  # noqa: ANN201 - Process
        """A spawned process by its id (as `spawn` and `ps` show it) or its name."""
        from tlimage.runtime._procs import Process, list_processes

        if isinstance(pid, int) or str(pid).isdigit():
            return Process(self, int(pid))
        hits = [p for p in list_processes(self) if p.status().name == pid]
        if not hits:
            raise RuntimeError_(f"sandbox {self.id} has no process named {pid!r}")
        return hits[-1]

    def cp_in(self, src: str | os.PathLike[str], dest: str) -> str:
        """Copies a host file or folder into the sandbox; `dest` an existing folder means
        into it. Returns the path written in the sandbox."""
        if not dest.startswith("/"):
            raise RuntimeError_(f"sandbox paths must be absolute, got {dest!r}")
        if not os.path.lexists(src):
            raise RuntimeError_(f"{os.fspath(src)}: no such file or folder on the host")
        rec = self._running("copy into it")
        return self._backend().put(rec, Path(src), dest)

    def cp_out(self, src: str, dest: str | os.PathLike[str]) -> Path:
        """Copies a file or folder out of the sandbox; `dest` an existing folder means into
        it. Returns the host path written."""
        if not src.startswith("/"):
            raise RuntimeError_(f"sandbox paths must be absolute, got {src!r}")
        rec = self._running("copy out of it")
        return self._backend().get(rec, src, Path(dest))

    # -- lifecycle ------------------------------------------------------------------------

    def snapshot(self, register: str | None = None, *, _keep: bool = True):  # noqa: ANN201
        """The sandbox's filesystem as a registered image: the image's layers plus one layer
        of what changed (none when nothing did). Registered as `register` (NAME[:TAG]) or as
        `<sandbox id>:snap-<n>`. A running sandbox is frozen while its changes are read."""
        from tlimage.registry import parse_ref

        if register is not None:
            parse_ref(register)
        rec = self.refresh()
        with _lock(rec, what="snapshot it"):
            rec = self.refresh()
            if rec.status not in (Status.RUNNING, Status.SUSPENDED):
                raise RuntimeError_(f"cannot snapshot sandbox {_label(rec)}: it is {rec.status}")
            prev = rec.status
            rec = self._db.transition(rec.id, [prev], Status.SNAPSHOTTING, prev_status=str(prev),
                                      **op_owner())  # fmt: skip
            n = self._db.next_snapshot(rec.id)
            try:
                layer = _snapshot_layer(rec, self._backend(), n, running=prev is Status.RUNNING)
            finally:
                self._rec = self._db.transition(
                    rec.id,
                    [Status.SNAPSHOTTING],
                    prev,
                    prev_status=None,
                    op_pid=None,
                    op_start=None,
                )
            return _register_snapshot(
                self._rec, layer, register or f"{rec.id}:snap-{n}", keep=_keep
            )

    def suspend(self) -> SuspendResult:
        """Pauses a named sandbox. The microVM saves its memory to a file and exits (it then
        survives a host reboot); the namespace backend freezes its processes in RAM."""
        rec = self.refresh()
        if not rec.persistent:
            raise RuntimeError_(
                f"sandbox {rec.id} is ephemeral (unnamed); only named sandboxes can be suspended",
                hint="create it with a name: tl sbx new NAME --image ...",
            )
        with _lock(rec, what="suspend it"):
            rec = self._db.transition(rec.id, [Status.RUNNING], Status.SUSPENDING, **op_owner())
            t0 = time.monotonic()
            be = self._backend()
            try:
                result = be.suspend(rec)
            except BaseException:
                with contextlib.suppress(Exception):
                    be.abort_suspend(rec)
                self._rec = self._db.transition(rec.id, [Status.SUSPENDING], Status.RUNNING,
                                                op_pid=None, op_start=None)  # fmt: skip
                raise
            changes = result.pop("changes", {})
            self._rec = self._db.transition(rec.id, [Status.SUSPENDING], Status.SUSPENDED,
                                            suspended_at=now(), op_pid=None, op_start=None,
                                            **changes)  # fmt: skip
            return SuspendResult(time.monotonic() - t0, **result)

    def resume(self) -> float:
        """Continues a suspended sandbox; returns the seconds it took. Time spent suspended
        does not count against the timeout."""
        rec = self.refresh()
        with _lock(rec, what="resume it"):
            rec = self.refresh()
            if rec.status is not Status.SUSPENDED:
                raise RuntimeError_(f"cannot resume sandbox {_label(rec)}: it is {rec.status}")
            t0 = time.monotonic()
            deadline = rec.deadline
            if deadline is not None and rec.suspended_at is not None:
                deadline += max(0.0, now() - rec.suspended_at)
            be = self._backend()
            changes = be.resume(rec, deadline) or {}
            self._rec = self._db.transition(rec.id, [Status.SUSPENDED], Status.RUNNING,
                                            deadline=deadline, suspended_at=None,
                                            **changes)  # fmt: skip
            return time.monotonic() - t0

    def clone(self, name: str | None = None, *, register: str | None = None,
              memory: bool = False, with_secrets: bool = False) -> Sandbox:  # fmt: skip
        """A new sandbox (same backend, resources, timeout, entrypoint, env) booted from a
        snapshot of this one's filesystem. The snapshot is registered only as `register`.
        With `memory` (microVM, named sandboxes) the clone starts from this one's memory and
        device state too, so its processes continue in both; of a sandbox created with
        secrets only with `with_secrets` (its memory holds their values)."""
        if memory:
            if register is not None:
                raise RuntimeError_("a memory clone registers no image; snapshot it separately")
            _refuse_secrets_in_memory(self.refresh(), "clone", with_secrets)
            return self._clone_memory(name)
        rec = self.refresh()
        img = self.snapshot(register, _keep=register is not None)
        return Sandbox.create(
            img, name=name, project=rec.project, backend=rec.backend, cpus=rec.cpus,
            memory=rec.memory_mb, timeout=rec.timeout, entrypoint=rec.entrypoint, env=rec.env,
            workdir=rec.workdir, user=rec.user, network=rec.network,
            cache_dir=Path(rec.cache_dir) if rec.cache_dir else None,
            secret_names=rec.extra.get("secret_names") or None, _source=rec.id,
        )  # fmt: skip

    def _clone_memory(self, name: str | None) -> Sandbox:
        src = self.refresh()
        be = self._backend()
        if not hasattr(be, "clone_memory"):
            raise RuntimeError_(f"memory clones are not available on the {src.backend} backend "
                                "(the namespace backend clones the filesystem only: CRIU is "
                                "not used); clone without --memory")  # fmt: skip

        def start(rec: SandboxRecord):  # noqa: ANN202
            with _lock(src, what="clone it"):
                live = self._running("clone with memory")
                return be.clone_memory(live, rec)

        return _start_copy(src, name, start, self._db)

    def save_memory(self, name: str | None = None, *, with_secrets: bool = False) -> str:
        """A restorable memory checkpoint of this running sandbox (microVM, named sandboxes):
        device state, RAM and filesystem, kept in the state folder as `name` (default
        `<id>-mem-<n>`); `Sandbox.from_checkpoint(name)` starts a sandbox from it. Returns
        the checkpoint's name. Of a sandbox created with secrets only with `with_secrets`
        (its memory holds their values, and so would the checkpoint)."""
        import json

        rec = self.refresh()
        _refuse_secrets_in_memory(rec, "snapshot", with_secrets)
        be = self._backend()
        if not hasattr(be, "save_memory"):
            raise RuntimeError_(f"memory snapshots are not available on the {rec.backend} "
                                "backend (filesystem only: CRIU is not used); snapshot "
                                "without --memory")  # fmt: skip
        if name is None:
            name = f"{rec.id}-mem-{self._db.next_snapshot(rec.id)}"
        _check_checkpoint_name(name)
        dest = checkpoints_root(rec.project) / name
        if dest.exists():
            raise RuntimeError_(f"checkpoint {name!r} exists in project {rec.project!r}")
        tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True)
        try:
            with _lock(rec, what="snapshot its memory"):
                live = self._running("snapshot its memory")
                be.save_memory(live, tmp)
            saved = {k: v for k, v in live.__dict__.items() if k not in _VOLATILE}
            (tmp / "record.json").write_text(json.dumps(saved, indent=1, default=str))
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, name: str | None = None,
                        project: str | None = None) -> Sandbox:  # fmt: skip
        """A new sandbox started from a memory checkpoint (`save_memory`): its processes
        continue where they were when it was taken."""
        import json

        reconcile()
        _check_checkpoint_name(checkpoint)
        saved = checkpoints_root(project_name(project)) / checkpoint
        try:
            d = json.loads((saved / "record.json").read_text())
        except FileNotFoundError:
            raise RuntimeError_(
                f"no checkpoint {checkpoint!r} in project {project_name(project)!r}",
                hint="make one with: tl sbx snapshot NAME --memory",
            ) from None
        fields_ = {f.name for f in dataclasses.fields(SandboxRecord)}
        src = SandboxRecord(**{k: v for k, v in d.items() if k in fields_},
                            **{k: None for k in _VOLATILE if k not in ("status", "pids")},
                            status=Status.RUNNING, pids={})  # fmt: skip
        be = backend_for(src.backend)

        def start(rec: SandboxRecord):  # noqa: ANN202
            return be.start_from_memory(rec, saved)

        return _start_copy(src, name, start, StateDB(), source=f"checkpoint {checkpoint}")

    def terminate(self) -> None:
        """Ends the sandbox: every process (and VM) is killed, nothing stays mounted; an
        ephemeral sandbox's filesystem is removed. Idempotent."""
        rec = self.refresh()
        if rec.status is Status.TERMINATED:
            return
        with _lock(rec, what="terminate it"):
            rec = self.refresh()
            if rec.status is Status.TERMINATED:
                return
            _finish(rec, self._db, "terminated")
            self.refresh()

    def start(self) -> Sandbox:
        """Starts a terminated named sandbox again, on its kept filesystem (same image, backend,
        resources, entrypoint, env; the timeout counts afresh). Returns once it runs."""
        rec = self.refresh()
        if not rec.persistent:
            raise RuntimeError_(
                f"sandbox {_label(rec)} is not named, so its files are gone",
                hint="only named sandboxes (tl sbx new NAME) can be started again",
            )
        if rec.status is not Status.TERMINATED:
            raise RuntimeError_(
                f"sandbox {_label(rec)} is {rec.status}",
                hint="`tl sbx start` restarts terminated sandboxes",
            )
        if rec.name is not None:
            other = self._db.find_name(rec.project, rec.name)
            if other is not None and other.id != rec.id and other.status in LIVE:
                raise RuntimeError_(f"the name {rec.name!r} is taken by sandbox {other.id}")
        with _lock(rec, what="start it"):
            rec = self._db.transition(
                rec.id, [Status.TERMINATED], Status.PENDING, terminated_at=None, reason=None,
                exit_code=None, started_at=None, deadline=None, suspended_at=None, pids={},
                boot_id=_proc.boot_id(), **op_owner())  # fmt: skip
            be = backend_for(rec.backend)

            def start() -> tuple[dict, dict, Callable[[], None]]:
                lowers = _lowers(rec)
                config = rec.extra.get("config") or {}
                ep = None
                if rec.entrypoint:
                    ep = {"argv": list(rec.entrypoint),
                          "env": merge_env(config.get("env", []), rec.env),
                          "secret_env": _secret_env(rec),
                          "user": rec.user or config.get("user", "root"),
                          "workdir": rec.workdir or config.get("workdir", "/")}  # fmt: skip
                return be.start(rec, lowers, ep)

            rec = _boot(rec, self._db, be, start, keep_fs=True,
                        reason="failed to start again")  # fmt: skip
        self._rec = rec
        return self

    def remove(self) -> None:
        """Terminates if needed, then deletes the sandbox's files and its record."""
        self.terminate()
        rec = self.refresh()
        with _lock(rec):
            shutil.rmtree(rec.path, ignore_errors=True)
            shutil.rmtree(rec.run_path, ignore_errors=True)
            self._db.delete(rec.id)

    def wait(self, timeout: float | None = None) -> Status:
        """Waits until the sandbox has ended (entrypoint exit, timeout, terminate)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reconcile()
            st = self.status
            if st is Status.TERMINATED:
                return st
            if deadline is not None and time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving a `with` block terminates an ephemeral sandbox; a named one keeps running."""
        if not self._rec.persistent:
            self.terminate()


def list_sandboxes(project: str | None = None, *, all_projects: bool = False,
                   include_terminated: bool = False) -> list[Sandbox]:  # fmt: skip
    reconcile()
    db = StateDB()
    recs = db.list(None if all_projects else project_name(project),
                   None if include_terminated else LIVE)  # fmt: skip
    return [Sandbox(r, db) for r in recs]


def live_layer_digests() -> set[str]:
    """Layer digests that sandboxes still use: a namespace sandbox mounts their unpacked
    folders as its lowers until it has ended, so cache pruning must keep them (microVM
    sandboxes hold hard links to their disk images and need nothing from the cache)."""
    out: set[str] = set()
    for rec in StateDB().list(None, LIVE):
        out.update(la["digest"] for la in rec.extra.get("layers", []))
    return out


def live_cache_paths() -> set[Path]:
    """Files below the cache that live sandboxes will read again (a microVM sandbox's guest
    kernel and initramfs, named in its QEMU command line, are needed to resume it), so
    pruning the cache must keep them."""
    out: set[Path] = set()
    for rec in StateDB().list(None, LIVE):
        try:
            argv = json.loads((rec.path / "qemu-argv.json").read_text())
        except (OSError, ValueError):
            continue
        out.update(Path(a) for a in argv if isinstance(a, str) and a.startswith("/"))
    return out


# --- internals -------------------------------------------------------------------------------

_VOLATILE = ("status", "created_at", "started_at", "terminated_at", "deadline", "suspended_at",
             "reason", "exit_code", "pids", "op_pid", "op_start", "prev_status")  # fmt: skip
CHECKPOINTS = "checkpoints-v1"


def checkpoints_root(project: str) -> Path:
    return state_dir() / CHECKPOINTS / project


def _check_checkpoint_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,79}", name):
        raise RuntimeError_(f"invalid checkpoint name {name!r}: use lowercase letters, digits, "
                            "'.', '_' and '-'")  # fmt: skip


def list_checkpoints(project: str | None = None) -> list[str]:
    root = checkpoints_root(project_name(project))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "record.json").exists())


def remove_checkpoint(name: str, project: str | None = None) -> None:
    _check_checkpoint_name(name)
    path = checkpoints_root(project_name(project)) / name
    if not (path / "record.json").exists():
        raise RuntimeError_(f"no checkpoint {name!r} in project {project_name(project)!r}")
    shutil.rmtree(path)


def _start_copy(src: SandboxRecord, name: str | None, start, db: StateDB,  # noqa: ANN001
                source: str | None = None) -> Sandbox:  # fmt: skip
    """A new sandbox like `src` (resources, image, env, timeout) started by `start(rec)`
    (which returns (pids, extra, confirm) as a backend's `start` does)."""
    import dataclasses

    if name is not None:
        _check_name(name)
    sid = new_id()
    path = private_dir(sandboxes_root()) / sid
    path.mkdir(parents=True)
    rec = dataclasses.replace(
        src, id=sid, name=name, status=Status.PENDING, created_at=now(), started_at=None,
        terminated_at=None, deadline=None, suspended_at=None, reason=None, exit_code=None,
        pids={}, dir=str(path), run_dir=str(run_root() / sid), source=source or src.id,
        snapshots=0, prev_status=None, extra=dict(src.extra), boot_id=_proc.boot_id(),
        **op_owner(),
    )  # fmt: skip
    be = backend_for(rec.backend)
    with _lock(rec):
        _insert(db, rec)
        rec = _boot(rec, db, be, lambda: start(rec), keep_fs=False, reason="failed to start")
    return Sandbox(rec, db)


def _boot(rec: SandboxRecord, db: StateDB, be: Any,
          start: Callable[[], tuple[dict, dict, Callable[[], None]]], *, keep_fs: bool,
          reason: str) -> SandboxRecord:  # fmt: skip
    """Starts the PENDING sandbox `rec` with `start()` (a backend's start: pids, extra,
    confirm) and records it RUNNING. Its timeout counts from here, so a slow boot (TCG) does
    not eat into it; the supervisor reads the deadline once it has the confirmation. On any
    failure the sandbox is stopped, cleaned up (its files kept with `keep_fs`) and recorded
    TERMINATED with `reason`, and the error goes on."""
    try:
        be.set_deadline(rec, None)
        pids, extra, confirm = start()
        deadline = None if rec.timeout is None else time.time() + rec.timeout
        be.set_deadline(rec, deadline)
        rec = db.transition(rec.id, [Status.PENDING], Status.RUNNING, pids=pids,
                            extra={**rec.extra, **extra}, started_at=now(),
                            deadline=deadline, op_pid=None, op_start=None)  # fmt: skip
        confirm()
        return rec
    except BaseException as e:
        failed = db.get(rec.id) or rec
        with contextlib.suppress(Exception):
            be.stop(failed)
        with contextlib.suppress(Exception):
            be.cleanup(failed, keep_fs=keep_fs)
        with contextlib.suppress(Exception):
            db.transition(rec.id, LIVE, Status.TERMINATED, terminated_at=now(),
                          reason=f"{reason}: {_first_line(e)}",
                          op_pid=None, op_start=None)  # fmt: skip
        raise


def _network_policy(network: bool, policy: Any) -> dict[str, Any] | None:
    """The JSON form of a sandbox's network policy, checked; None without network."""
    from tlimage.sandbox.network import NetworkPolicy

    if policy is None:
        return None if not network else NetworkPolicy().to_json()
    if not network:
        raise RuntimeError_("a network policy was given for a sandbox without network "
                            "(--no-network): drop one of them")  # fmt: skip
    if isinstance(policy, dict):
        policy = NetworkPolicy.from_json(policy)
    if not isinstance(policy, NetworkPolicy):
        raise RuntimeError_(f"network_policy must be a NetworkPolicy or its JSON form, not "
                            f"{type(policy).__name__}")  # fmt: skip
    return policy.to_json()


def new_id() -> str:
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase
    return "sb-" + "".join(secrets.choice(alphabet) for _ in range(10))


def _systemd_backend(ref: str, requested: str, be_name: str, accel: str | None,
                     notice: Callable[[str], None] | None) -> tuple[str, str | None]:  # fmt: skip
    """An image whose init is systemd boots it as PID 1 in the microVM only: `auto` that
    chose the namespace sandbox (no KVM) takes the microVM under TCG instead, said once."""
    if be_name == "namespace" and requested == "auto":
        from tlimage.notices import once

        once("systemd-microvm", "tcg", f"{ref} boots systemd as init: it runs in the microVM "
             "(without KVM: emulated, slower to start)", notice)  # fmt: skip
        return "microvm", None
    _systemd_check(ref, be_name)
    return be_name, accel


def _systemd_check(ref: str, be_name: str) -> None:
    if be_name == "namespace":
        raise RuntimeError_(
            f"{ref} boots systemd as init, which the namespace backend does not run",
            hint="use --isolation microvm, or a minimal base (debian-minimal)",
        )


def _image_or_base(
    reg,
    proj: str,
    image: str | None,
    cache_dir: Path | None,  # noqa: ANN001
    notice: Callable[[str], None] | None,
    be_name: str,
    bases: BaseImages | None,
):  # noqa: ANN202 - ImageRecord
    """The registered image, else a base of the catalog of that name (built on first use),
    else the default base when `image` is None (the choice said once per machine)."""
    if image is not None and not isinstance(image, str):
        return image  # an ImageRecord already (a clone's unregistered snapshot)
    bases = current_bases(bases)
    if image is None:
        from tlimage.notices import once

        if bases is None:
            raise RuntimeError_(
                "no image given, and no base catalog to take the default base from",
                hint="name an image, or use `from tlimage import Sandbox` (or the tl CLI), "
                "which knows the bases",
            )
        image, why = bases.default()
        once("default-base", image, why, notice)
    rec = reg.find(proj, image)
    if rec is not None:
        return rec
    name, _, tag = image.partition(":")
    init = bases.init(name) if bases is not None and tag in ("", "latest") else None
    if init is not None:
        if init == "systemd" and be_name != "auto":
            _systemd_check(image, be_name)
        return bases.image(name, Path(cache_dir) if cache_dir else None)
    return reg.get(proj, image)  # raises, naming what is registered


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name) or name.startswith("sb-"):
        raise RuntimeError_(f"invalid sandbox name {name!r}: use lowercase letters, digits, "
                            "'.', '_' and '-' (at most 63), not starting with 'sb-'")  # fmt: skip


def _label(rec: SandboxRecord) -> str:
    return f"{rec.id} ({rec.name})" if rec.name else rec.id


def _first_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


def _store(rec: SandboxRecord):  # noqa: ANN202
    from tlimage.cache.store import BlobStore

    return BlobStore(rec.cache_dir)


def _lowers(rec: SandboxRecord) -> list[Path]:
    from tlimage.cache.unpacked import unpacked_layer

    store = _store(rec)
    return [unpacked_layer(store, la["digest"]) for la in rec.extra["layers"]]


def _snapshot_layer(rec: SandboxRecord, be: Backend, n: int, *, running: bool):  # noqa: ANN202
    """The LayerInfo of the sandbox's changes, or None when it changed nothing."""
    import tempfile

    from tlimage.cache.cache import LayerCache
    from tlimage.cache.layer import layer_from_upper

    lowers = _lowers(rec)
    with LayerCache(rec.cache_dir) as cache, cache.session(purpose="snapshot"):
        tmp = Path(tempfile.mkdtemp(prefix=".snap-", dir=rec.path))
        try:
            upper = tmp / "upper"
            with be.frozen_upper(rec, upper, lowers, running):
                if not any(upper.iterdir()):
                    return None
                info = layer_from_upper(upper, cache.store)
            cache.put(f"snapshot/{rec.id}/{n}", info,
                      description=f"snapshot of sandbox {rec.id}")  # fmt: skip
            return info
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _register_snapshot(
    rec: SandboxRecord,
    info,
    ref: str,
    *,  # noqa: ANN001, ANN202
    keep: bool = True,
):
    """Registers the image the sandbox booted plus `info` (a LayerInfo or None) as `ref`
    (`keep=False`: the same image record, unregistered — what a clone boots from)."""
    from tlimage.cache.store import BlobStore
    from tlimage.registry import Registry
    from tlimage.registry.db import ImageRecord, LayerRef, Manifest, parse_ref

    layers = [LayerRef(**la) for la in rec.extra["layers"]]
    if info is not None:
        layers.append(LayerRef(info.digest, info.diff_id, info.size))
    manifest = Manifest(layers=tuple(layers), config=dict(rec.extra.get("image_config") or {}),
                        base=f"{rec.image_ref}@{rec.image_id}")  # fmt: skip
    BlobStore(rec.cache_dir).put_bytes(manifest.to_bytes())
    name, tag = parse_ref(ref)
    if not keep:
        return ImageRecord(rec.project, name, tag, manifest.image_id(), manifest,
                           f"sandbox {rec.id}", time.time())  # fmt: skip
    return Registry().register(rec.project, name, tag, manifest, source=f"sandbox {rec.id}")


def _finish(rec: SandboxRecord, db: StateDB, reason: str) -> None:
    """Kills what is left, cleans up and records the end. Caller holds the lock."""
    be = backend_for(rec.backend)
    be.stop(rec)
    info = be.exit_info(rec) or {}
    be.cleanup(rec, keep_fs=rec.persistent)
    why = info.get("reason") or reason
    code = info.get("exit_code")
    if why == "entrypoint exited" and code is not None:
        why = f"entrypoint exited with code {code}"
    db.transition(rec.id, LIVE, Status.TERMINATED, terminated_at=info.get("at") or now(),
                  reason=why, exit_code=code, op_pid=None, op_start=None)  # fmt: skip


def reconcile() -> None:
    """Brings the records in line with the host: sandboxes whose processes are gone (crash,
    timeout, entrypoint exit, reboot) become Terminated and are cleaned up; operations whose
    process died are rolled back. Runs at the start of every CLI command; cheap when nothing
    is live."""
    db = StateDB()
    global _swept
    if not _swept:
        _swept = True
        with contextlib.suppress(OSError):
            _sweep(db)
    live = db.list(None, LIVE)
    if not live:
        return
    bid = _proc.boot_id()
    for rec in live:
        if _settled(rec, bid):
            continue
        fd = _try_lock(rec)
        if fd is None:
            continue  # an operation is in progress
        try:
            rec = db.get(rec.id)
            if rec is None or rec.status is Status.TERMINATED:
                continue
            be = backend_for(rec.backend)
            rebooted = rec.boot_id != bid
            if rebooted and not be.survives_reboot(rec):
                _finish(rec, db, "the host rebooted")
            elif rebooted:
                db.update(rec.id, boot_id=bid, pids={})
            elif rec.status is Status.PENDING:
                _finish(rec, db, "the process creating it died")
            elif not be.alive(rec):
                _finish(rec, db, "its processes ended unexpectedly")
            elif rec.status in TRANSITIONAL:
                _rollback(rec, be, db)
            elif (
                rec.status is Status.RUNNING
                and rec.deadline is not None
                and now() > rec.deadline + 10
            ):
                _finish(rec, db, "timeout")
        finally:
            if fd >= 0:
                os.close(fd)


def _settled(rec: SandboxRecord, bid: str) -> bool:
    """Nothing for reconcile to do, judged from the listed row without taking its lock (which
    made every create cost a lock and a read per live sandbox): running on this boot, its
    processes alive, within its deadline. Anything else is looked at under the lock."""
    if rec.status is not Status.RUNNING or rec.boot_id != bid:
        return False
    if rec.deadline is not None and now() > rec.deadline + 10:
        return False
    return backend_for(rec.backend).alive(rec)


STRAY_MIN_AGE = 120.0  # seconds: a sandbox whose folder still exists may be being created


def stray_sandboxes() -> list[Any]:
    """Sandboxes of this state folder that run with no live record: their folder was removed
    (a benchmark or test that failed half-way removed its state folder) or their record was
    lost, so no command can reach them. A sandbox's processes say which state folder is
    theirs (sandbox/stray.py); another state folder's sandboxes are never among them. One
    whose folder still exists counts only once it is older than STRAY_MIN_AGE (its record
    may be on its way). Returns `tlimage.sandbox.stray.Stray` items."""
    from tlimage.sandbox import stray

    db = StateDB()
    live = {r.id for r in db.list(None, LIVE)} if db.path.exists() else set()
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    out = []
    for s in stray.find(sandboxes_root()):
        age = uptime - s.process[1] / ticks
        if s.sandbox_id not in live and (not s.folder_exists or age > STRAY_MIN_AGE):
            out.append(s)
    return out


def end_stray_sandboxes() -> list[tuple[Any, bool]]:
    """Ends what `stray_sandboxes()` finds (processes, then cgroups); (stray, all gone)."""
    from tlimage.sandbox import stray

    return [(s, stray.end(s)) for s in stray_sandboxes()]


_swept = False
SWEEP_MIN_AGE = 120.0  # seconds: younger leftovers may belong to a sandbox being created


def _sweep(db: StateDB) -> None:
    """Removes what no record accounts for (once per process): sandbox folders without a row
    (a crash between creating the folder and inserting the row), mounts under the sandboxes'
    folder (none are made on the host; a host that shares them must not keep them), and empty
    cgroups left by a killed start."""
    root = sandboxes_root()
    known = {r.id for r in db.list()}
    cutoff = time.time() - SWEEP_MIN_AGE
    if root.is_dir():
        for entry in os.scandir(root):
            if (entry.name.startswith("sb-") and entry.name not in known
                    and entry.stat().st_mtime < cutoff):  # fmt: skip
                shutil.rmtree(entry.path, ignore_errors=True)
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        import ctypes

        ctypes.CDLL(None).umount2(point.encode(), 2)  # MNT_DETACH
    from tlimage.sandbox.cgroup import stale_cgroups

    for d in stale_cgroups(live={r.id for r in db.list(None, LIVE)}, older_than=cutoff):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _rollback(rec: SandboxRecord, be: Backend, db: StateDB) -> None:
    if rec.status is Status.SNAPSHOTTING:
        prev = Status(rec.prev_status or Status.RUNNING)
        if prev is Status.RUNNING:
            be.thaw(rec)
        db.transition(rec.id, [Status.SNAPSHOTTING], prev, prev_status=None, op_pid=None,
                      op_start=None)  # fmt: skip
    elif rec.status is Status.SUSPENDING:
        to = Status(be.rollback_suspend(rec))
        db.transition(rec.id, [Status.SUSPENDING], to, op_pid=None, op_start=None,
                      suspended_at=now() if to is Status.SUSPENDED else None)  # fmt: skip
