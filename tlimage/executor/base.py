"""The executor protocol: run one build step on a stack of layers, return what it changed.

Layer format, in both directions, is an *overlay-style directory* on the host:
- a plain directory tree is a valid layer (a fully applied rootfs is one layer);
- a 0:0 character device named `x` deletes `x` from the layers below (a whiteout);
- a directory with the xattr `trusted.overlay.opaque=y` hides everything below it (opaque).

`RunRequest.lowers` are such directories, bottom first; a `RunResult.upper` from an earlier run
can be passed as a lower as it is. The upper is what `tlimage.cache.layer.layer_from_upper`
turns into an OCI layer. Uppers never contain overlayfs' redirect or metacopy xattrs, and each
whiteout is its own inode (overlayfs shares one whiteout inode between many names; backends
break those links so a layer writer never sees whiteouts as hard links).

Every backend guarantees: the step's process tree and any VM are gone when `run` returns or
raises (timeouts, KeyboardInterrupt and crashes included); temporary files are removed; the
upper dir exists only if `run` returned normally.

`RunRequest.mounts` are extra filesystems for one step (RUN --mount): host folders, read-only or
write-discarding views of layer stacks, tmpfs and secrets. Nothing a mount shows reaches the
upper: a backend creates any missing mount point for the step and removes it afterwards (unless
the step put something beside it), as BuildKit does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from tlimage.errors import ExecutorError

# Re-exported: the namespace executor and runtime import them from here.
from tlimage.sandbox.upper import OPAQUE_XATTR as OPAQUE_XATTR
from tlimage.sandbox.upper import normalize_upper as normalize_upper

Stream = Literal["stdout", "stderr"]
OutputCallback = Callable[[Stream, bytes], None]

# Build steps run with this PATH unless their env sets one (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StepTimeout(ExecutorError):
    """A step ran longer than its timeout; it was killed and nothing was kept."""


MountKind = Literal["bind", "view", "tmpfs", "secret"]


@dataclass(frozen=True)
class HostMount:
    """One mount for one step. Build with the constructors, not the fields:

    - `bind(source, target)`: a host folder or file; writes land in it (cache mounts).
    - `view(layers, subpath, target)`: the folder `subpath` of a stack of overlay-style layers
      (bottom first), e.g. another stage or the build context plus a layer of whiteouts for its
      ignored files. Symlinks on `subpath` resolve inside the stack, never on the host. When
      writable, writes go to a throwaway upper and are discarded.
    - `tmpfs(target, size)`: an empty tmpfs; `size` in bytes, None for the kernel's default.
    - `secret(data, target, env)`: `data` as a file at `target` (owner uid:gid, `mode`, on a
      tmpfs, never on disk) and/or as the value of the environment variable `env`. The bytes
      are kept out of `repr` and must never be logged.

    `target` is absolute in the step's root ("" only for an env-only secret); symlinks in it
    resolve inside the root."""

    kind: MountKind
    target: str
    source: Path | None = None
    layers: tuple[Path, ...] = ()
    subpath: str = "/"
    readonly: bool = True
    size: int | None = None
    data: bytes = field(default=b"", repr=False)
    env: str = ""
    uid: int = 0
    gid: int = 0
    mode: int = 0o400
    # The sources never change (store layers): a backend may cache what it derives from them.
    stable: bool = False

    @classmethod
    def bind(cls, source: Path, target: str, *, readonly: bool = False) -> HostMount:
        return cls("bind", target, source=source, readonly=readonly)

    @classmethod
    def view(cls, layers: tuple[Path, ...], subpath: str, target: str, *, readonly: bool = True,
             stable: bool = False) -> HostMount:  # fmt: skip
        return cls("view", target, layers=tuple(layers), subpath=subpath, readonly=readonly,
                   stable=stable)  # fmt: skip

    @classmethod
    def tmpfs(cls, target: str, size: int | None = None) -> HostMount:
        return cls("tmpfs", target, readonly=False, size=size)

    @classmethod
    def secret(cls, data: bytes, target: str = "", *, env: str = "", uid: int = 0,
               gid: int = 0, mode: int = 0o400) -> HostMount:  # fmt: skip
        return cls("secret", target, data=data, env=env, uid=uid, gid=gid, mode=mode)

    def __post_init__(self) -> None:
        if self.kind not in ("bind", "view", "tmpfs", "secret"):
            raise ExecutorError(f"unknown mount kind {self.kind!r}")
        if self.target and (not self.target.startswith("/") or self.target.rstrip("/") == ""):
            raise ExecutorError(f"mount target must be an absolute path below /, got "
                                f"{self.target!r}")  # fmt: skip
        if not self.target and not (self.kind == "secret" and self.env):
            raise ExecutorError(f"{self.kind} mount needs a target")
        if self.kind == "bind" and self.source is None:
            raise ExecutorError("bind mount needs a source")
        if self.kind == "view" and not self.layers:
            raise ExecutorError("view mount needs at least one layer")


@dataclass(frozen=True)
class RunRequest:
    """One step. `upper_dir` must not exist yet (its parent must); the backend creates it and
    fills it with the step's changes. `env` is the complete environment of the step (no host
    variable leaks in); PATH defaults to DEFAULT_PATH when absent. `user` is Docker's USER syntax
    (`name`, `uid`, `name:group`, `uid:gid`), resolved against the layers' /etc/passwd and
    /etc/group. `workdir` must exist in the layers (or be a mount target). `timeout` is in seconds
    (None: no limit). `mounts` apply in order of their targets' depth, parents first."""

    lowers: tuple[Path, ...]
    argv: tuple[str, ...]
    upper_dir: Path
    env: tuple[tuple[str, str], ...] = ()
    user: str = "root"
    workdir: str = "/"
    timeout: float | None = None
    network: bool = True
    mounts: tuple[HostMount, ...] = ()

    def __post_init__(self) -> None:
        if not self.lowers:
            raise ExecutorError("RunRequest needs at least one lower layer (the base rootfs)")
        if not self.argv:
            raise ExecutorError("RunRequest needs a non-empty argv")
        if not self.workdir.startswith("/"):
            raise ExecutorError(f"workdir must be absolute, got {self.workdir!r}")

    def sorted_mounts(self) -> tuple[HostMount, ...]:
        """File mounts, shallowest target first (a stable sort: equal depths keep their order),
        so a mount inside another's target lands on top of it."""
        files = [m for m in self.mounts if m.target]
        return tuple(sorted(files, key=lambda m: m.target.rstrip("/").count("/")))

    def env_list(self) -> list[str]:
        """`KEY=VALUE` strings, with PATH added when the step does not set it."""
        out = [f"{k}={v}" for k, v in self.env]
        if not any(k == "PATH" for k, _ in self.env):
            out.insert(0, f"PATH={DEFAULT_PATH}")
        return out


@dataclass(frozen=True)
class RunResult:
    exit_code: int  # 0-255; 128+N when killed by signal N
    upper: Path  # overlay-style directory of the changes (== request.upper_dir)
    duration: float  # seconds from request to exit, including any VM boot
    opaque: tuple[str, ...] = field(default=())  # relative paths of opaque dirs in `upper`


@runtime_checkable
class Executor(Protocol):
    name: str

    def run(self, req: RunRequest, on_output: OutputCallback | None = None) -> RunResult:
        """Runs the step; streams output chunks to `on_output` as they arrive (from the calling
        thread). A non-zero exit is a result, not an error; errors are for steps that could
        not run (bad user or workdir, missing program, boot failure, timeout)."""
        ...

    def close(self) -> None:
        """Releases anything kept between runs (a warm VM). Idempotent."""
        ...
