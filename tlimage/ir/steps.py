"""The build steps: a closed union of frozen dataclasses.

Every front end lowers to these and nothing else; the builder, the cache keys and the text form
handle exactly this set (`STEP_TYPES`). Fields hold already-normalized values: tuples, not lists;
ordered pairs, not dicts (ENV order matters and keys may repeat, as in `ENV A=1 A=2`).

A field left at its default is omitted from the canonical encoding, so adding a new field with a
default later does not change the digest of any existing step.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import ClassVar, Literal

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Step:
    op: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class From(Step):
    """Starts a stage: a base image (`debian-minimal`, a registered name, `scratch`) or another
    stage of the same image. `pin` is the base's content digest; the builder fills it when
    resolving a name, and a pinned base that no longer matches is an error."""

    op: ClassVar[str] = "from"
    image: str | None = None
    stage: str | None = None
    pin: str | None = None
    platform: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.stage is None):
            raise ValueError("From needs exactly one of image= or stage=")


# -- RUN mounts --------------------------------------------------------------------------------
# One class per kind, with BuildKit's defaults already filled in by the front end (as
# dockerfile2llb fills LLB's `ops.proto` Mount): a cache's id, a secret's id and file path, the
# ssh socket path. Each carries its kind as the `type` class attribute, which the codec writes
# and reads as the "type" field (`{"type": "cache", "target": "/root/.cache", "id": ...}`).

Sharing = Literal["shared", "private", "locked"]


def _check_target(kind: str, target: str) -> None:
    if not target.startswith("/") or posixpath.normpath(target) != target or target == "/" \
            or target.startswith("//"):  # fmt: skip
        raise ValueError(f"a {kind} mount's target must be a normalized absolute path below /, "
                         f"got {target!r}")  # fmt: skip


@dataclass(frozen=True, slots=True)
class BindMount:
    """The build context (`from_` None) or a stage/image's files at `source`, shown at
    `target`; read-only unless `readonly` is False (writes are discarded after the step)."""

    type: ClassVar[str] = "bind"
    target: str
    source: str = ""
    from_: str | None = None
    readonly: bool = True

    def __post_init__(self) -> None:
        _check_target("bind", self.target)


@dataclass(frozen=True, slots=True)
class CacheMount:
    """A folder kept on the host between builds, found by `id` (BuildKit's default: the
    target) and what it starts from (`from_`/`source`, or `uid`/`gid`/`mode`)."""

    type: ClassVar[str] = "cache"
    target: str
    id: str
    sharing: Sharing = "shared"
    from_: str | None = None
    source: str = ""
    readonly: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        _check_target("cache", self.target)
        if not self.id:
            raise ValueError("a cache mount needs an id")


@dataclass(frozen=True, slots=True)
class TmpfsMount:
    """Scratch space at `target`; `size` in bytes (None: the kernel's default)."""

    type: ClassVar[str] = "tmpfs"
    target: str
    size: int | None = None

    def __post_init__(self) -> None:
        _check_target("tmpfs", self.target)


@dataclass(frozen=True, slots=True)
class SecretMount:
    """The build secret `id` as a file at `target` and/or in the environment variable `env`
    (`target` "" only when `env` is set). Its value never enters the IR or a key."""

    type: ClassVar[str] = "secret"
    id: str
    target: str = ""
    env: str = ""
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a secret mount needs an id")
        if self.target:
            _check_target("secret", self.target)
        elif not self.env:
            raise ValueError("a secret mount needs a target or an env")


@dataclass(frozen=True, slots=True)
class SshMount:
    """An SSH agent socket at `target`."""

    type: ClassVar[str] = "ssh"
    id: str = "default"
    target: str = "/run/buildkit/ssh_agent.0"
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        _check_target("ssh", self.target)


Mount = BindMount | CacheMount | TmpfsMount | SecretMount | SshMount
MOUNT_TYPES: dict[str, type[Mount]] = {
    cls.type: cls for cls in (BindMount, CacheMount, TmpfsMount, SecretMount, SshMount)
}


@dataclass(frozen=True, slots=True)
class Run(Step):
    """Run a command. Shell form: `command` is one string run by the stage's SHELL.
    Exec form: `command` is the argv. `env`, `user`, `workdir` override the stage's for this
    step only (DSL `run(..., options=...)`)."""

    op: ClassVar[str] = "run"
    command: tuple[str, ...] = ()
    shell: bool = True
    env: Pairs = ()
    user: str | None = None
    workdir: str | None = None
    mounts: tuple[Mount, ...] = ()
    network: Literal["default", "none", "host"] = "default"
    security: Literal["sandbox", "insecure"] = "sandbox"


@dataclass(frozen=True, slots=True)
class InlineFile:
    """A file whose bytes are in the definition (a Dockerfile heredoc `COPY <<EOF /dest`)."""

    name: str
    content: str
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class Copy(Step):
    """Copy files from the build context, another stage (`from_`) or inline content into `dest`."""

    op: ClassVar[str] = "copy"
    sources: tuple[str, ...] = ()
    dest: str = ""
    from_: str | None = None
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()
    inline: tuple[InlineFile, ...] = ()


@dataclass(frozen=True, slots=True)
class Add(Step):
    """Like Copy, and also: URLs are fetched, local tar archives are unpacked."""

    op: ClassVar[str] = "add"
    sources: tuple[str, ...] = ()
    dest: str = ""
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    excludes: tuple[str, ...] = ()
    checksum: str | None = None
    keep_git_dir: bool = False
    inline: tuple[InlineFile, ...] = ()


@dataclass(frozen=True, slots=True)
class Env(Step):
    op: ClassVar[str] = "env"
    vars: Pairs = ()


@dataclass(frozen=True, slots=True)
class Workdir(Step):
    op: ClassVar[str] = "workdir"
    path: str = ""


@dataclass(frozen=True, slots=True)
class User(Step):
    op: ClassVar[str] = "user"
    user: str = ""


@dataclass(frozen=True, slots=True)
class Arg(Step):
    """A build argument; `default` None means declared without a default."""

    op: ClassVar[str] = "arg"
    name: str = ""
    default: str | None = None


@dataclass(frozen=True, slots=True)
class Label(Step):
    op: ClassVar[str] = "label"
    labels: Pairs = ()


@dataclass(frozen=True, slots=True)
class Expose(Step):
    """Ports as `NUMBER/PROTO`, protocol always spelled out (`80/tcp`)."""

    op: ClassVar[str] = "expose"
    ports: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Entrypoint(Step):
    op: ClassVar[str] = "entrypoint"
    command: tuple[str, ...] = ()
    shell: bool = False


@dataclass(frozen=True, slots=True)
class Cmd(Step):
    op: ClassVar[str] = "cmd"
    command: tuple[str, ...] = ()
    shell: bool = False


@dataclass(frozen=True, slots=True)
class Shell(Step):
    op: ClassVar[str] = "shell"
    argv: tuple[str, ...] = ("/bin/sh", "-c")


@dataclass(frozen=True, slots=True)
class StopSignal(Step):
    op: ClassVar[str] = "stopsignal"
    signal: str = ""


@dataclass(frozen=True, slots=True)
class Healthcheck(Step):
    """`test` follows the OCI/Docker config: `("NONE",)`, `("CMD", argv...)` or
    `("CMD-SHELL", command)`. Durations are nanoseconds; None means the runtime default."""

    op: ClassVar[str] = "healthcheck"
    test: tuple[str, ...] = ("NONE",)
    interval: int | None = None
    timeout: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    retries: int | None = None


@dataclass(frozen=True, slots=True)
class Volume(Step):
    op: ClassVar[str] = "volume"
    paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Onbuild(Step):
    """A trigger kept in the image config, run by images that build FROM this one."""

    op: ClassVar[str] = "onbuild"
    instruction: str = ""


STEP_TYPES: dict[str, type[Step]] = {
    cls.op: cls
    for cls in (
        From, Run, Copy, Add, Env, Workdir, User, Arg, Label, Expose,
        Entrypoint, Cmd, Shell, StopSignal, Healthcheck, Volume, Onbuild,
    )
}  # fmt: skip

# Steps that change the filesystem and so produce a layer; the rest only change the config.
FILESYSTEM_OPS = frozenset({"run", "copy", "add", "workdir"})
