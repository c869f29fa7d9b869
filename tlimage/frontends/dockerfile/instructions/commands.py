"""The typed instructions: value types, one frozen dataclass per instruction, stages and the
whole program. Each command's `expand` replaces the fields BuildKit expands."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

from tlimage.errors import DockerfileError
from tlimage.frontends.dockerfile import _values
from tlimage.frontends.dockerfile._gostr import go_lower
from tlimage.frontends.dockerfile.parser import ParseWarning
from tlimage.frontends.mounts import MountSpec as Mount
from tlimage.frontends.mounts import parse_mount
from tlimage.frontends.problem import Problem
from tlimage.source import Span

Expander = Callable[[str], str]


class DockerfileInstructionError(DockerfileError):
    """An instruction is not valid: unknown instruction or flag, wrong arguments, bad value."""


# ------------------------------------------------------------------------------ value types


@dataclass(frozen=True, slots=True)
class KeyValuePair:
    """One ENV/LABEL pair. `no_delim` marks the legacy `ENV key value` form."""

    key: str
    value: str
    no_delim: bool = False


@dataclass(frozen=True, slots=True)
class ArgDef:
    """One ARG name with its default (None when it has none, "" for `ARG x=`)."""

    key: str
    value: str | None = None
    comment: str = ""


@dataclass(frozen=True, slots=True)
class SourceContent:
    """A COPY/ADD source given inline by a heredoc. `data` is chomped already for `<<-`;
    `expand` says whether variables in it are to be expanded (unquoted delimiter)."""

    path: str
    data: str
    expand: bool


@dataclass(frozen=True, slots=True)
class ShellInlineFile:
    """A RUN heredoc: the script (or stdin) the command reads. `data` is not chomped; `chomp`
    says `<<-` was used."""

    name: str
    data: str
    chomp: bool


NETWORK_MODES = ("default", "none", "host")
SECURITY_MODES = ("sandbox", "insecure")

# --------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """What every instruction carries: the keyword as written, where it is (start line and
    column; `span.end_line` is its last line, heredoc bodies included) and its logical line."""

    NAME: ClassVar[str] = ""
    keyword: str
    span: Span
    original: str

    @property
    def name(self) -> str:
        return self.NAME

    def expand(self, expander: Expander) -> Command:
        """A copy with the fields BuildKit expands replaced by `expander(field)`."""
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class FromCommand(Command):
    """`FROM [--platform=p] base [AS name]`. `stage_name` is lower-cased (stage names are
    case-insensitive); "" when there is none. `base` and `platform` expand with the global
    (pre-FROM) ARGs only, so they are expanded by the caller, not by `expand`."""

    NAME: ClassVar[str] = "from"
    base: str
    stage_name: str = ""
    platform: str = ""
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCommand(Command):
    """`RUN`. Shell form (`prepend_shell`): `cmd` is one string for the stage's SHELL; exec
    form: `cmd` is the argv. `files` are its heredocs. `mount_specs` are the raw `--mount`
    values and `mounts` their parse (values with `$` in them unexpanded until `expand`)."""

    NAME: ClassVar[str] = "run"
    cmd: tuple[str, ...]
    prepend_shell: bool
    files: tuple[ShellInlineFile, ...] = ()
    mounts: tuple[Mount, ...] = ()
    mount_specs: tuple[str, ...] = ()
    network: str = "default"
    security: str = "sandbox"
    flags_used: tuple[str, ...] = ()

    def expand(self, expander: Expander) -> RunCommand:
        if not self.mount_specs:
            return self
        try:
            mounts = tuple(parse_mount(spec, expander) for spec in self.mount_specs)
        except Problem as e:
            raise DockerfileInstructionError(e.message, self.span, hint=e.hint) from None
        return replace(self, mounts=mounts)


@dataclass(frozen=True, slots=True, kw_only=True)
class CmdCommand(Command):
    NAME: ClassVar[str] = "cmd"
    cmd: tuple[str, ...]
    prepend_shell: bool
    files: tuple[ShellInlineFile, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class EntrypointCommand(Command):
    """`ENTRYPOINT`; `cmd` is None for `ENTRYPOINT []` (which clears it)."""

    NAME: ClassVar[str] = "entrypoint"
    cmd: tuple[str, ...] | None
    prepend_shell: bool
    files: tuple[ShellInlineFile, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ShellCommand(Command):
    NAME: ClassVar[str] = "shell"
    shell: tuple[str, ...]


def _expand_all(expander: Expander, values: Iterable[str]) -> tuple[str, ...]:
    return tuple(expander(v) for v in values)


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyCommand(Command):
    """`COPY [--from=] [--chown=] [--chmod=] [--link] [--parents] [--exclude=]... src... dest`.
    `sources` are paths; heredoc sources are in `contents`, in their own order."""

    NAME: ClassVar[str] = "copy"
    sources: tuple[str, ...]
    contents: tuple[SourceContent, ...]
    dest: str
    from_: str = ""
    chown: str = ""
    chmod: str = ""
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()

    def expand(self, expander: Expander) -> CopyCommand:
        return replace(self, **_expand_copy_fields(self, expander))


@dataclass(frozen=True, slots=True, kw_only=True)
class AddCommand(Command):
    """`ADD` (sources may be URLs or git repositories, and local archives are unpacked).
    `unpack` is None unless `--unpack` was given."""

    NAME: ClassVar[str] = "add"
    sources: tuple[str, ...]
    contents: tuple[SourceContent, ...]
    dest: str
    chown: str = ""
    chmod: str = ""
    link: bool = False
    keep_git_dir: bool = False
    checksum: str = ""
    excludes: tuple[str, ...] = ()
    unpack: bool | None = None

    def expand(self, expander: Expander) -> AddCommand:
        fields = _expand_copy_fields(self, expander)
        return replace(self, **fields, checksum=expander(self.checksum))


def _expand_copy_fields(cmd: CopyCommand | AddCommand, expander: Expander) -> dict[str, object]:
    """The fields COPY and ADD both expand, expanded; `--chmod` is checked once expanded."""
    chmod = expander(cmd.chmod)
    check_chmod(chmod, cmd)
    return {
        "sources": _expand_all(expander, cmd.sources),
        "dest": expander(cmd.dest),
        "chown": expander(cmd.chown),
        "chmod": chmod,
        "excludes": _expand_all(expander, cmd.excludes),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvCommand(Command):
    NAME: ClassVar[str] = "env"
    env: tuple[KeyValuePair, ...]

    def expand(self, expander: Expander) -> EnvCommand:
        return replace(self, env=_expand_pairs(expander, self.env))


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelCommand(Command):
    NAME: ClassVar[str] = "label"
    labels: tuple[KeyValuePair, ...]

    def expand(self, expander: Expander) -> LabelCommand:
        return replace(self, labels=_expand_pairs(expander, self.labels))


def _expand_pairs(expander: Expander, pairs: tuple[KeyValuePair, ...]) -> tuple[KeyValuePair, ...]:
    return tuple(KeyValuePair(expander(p.key), expander(p.value), p.no_delim) for p in pairs)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArgCommand(Command):
    NAME: ClassVar[str] = "arg"
    args: tuple[ArgDef, ...]

    def expand(self, expander: Expander) -> ArgCommand:
        return replace(
            self,
            args=tuple(
                ArgDef(expander(a.key), None if a.value is None else expander(a.value), a.comment)
                for a in self.args
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkdirCommand(Command):
    NAME: ClassVar[str] = "workdir"
    path: str

    def expand(self, expander: Expander) -> WorkdirCommand:
        return replace(self, path=expander(self.path))


@dataclass(frozen=True, slots=True, kw_only=True)
class UserCommand(Command):
    NAME: ClassVar[str] = "user"
    user: str

    def expand(self, expander: Expander) -> UserCommand:
        return replace(self, user=expander(self.user))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExposeCommand(Command):
    """`EXPOSE`; `ports` sorted as BuildKit sorts them. Expansion may split one word into
    several (`EXPOSE $PORTS`)."""

    NAME: ClassVar[str] = "expose"
    ports: tuple[str, ...]

    def expand(self, expander: Expander) -> ExposeCommand:
        ports: list[str] = []
        for p in self.ports:
            ports.extend(expander(p).split())
        return replace(self, ports=tuple(ports))


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeCommand(Command):
    NAME: ClassVar[str] = "volume"
    volumes: tuple[str, ...]

    def expand(self, expander: Expander) -> VolumeCommand:
        return replace(self, volumes=_expand_all(expander, self.volumes))


@dataclass(frozen=True, slots=True, kw_only=True)
class StopSignalCommand(Command):
    NAME: ClassVar[str] = "stopsignal"
    signal: str

    def expand(self, expander: Expander) -> StopSignalCommand:
        return replace(self, signal=expander(self.signal))


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthcheckCommand(Command):
    """`HEALTHCHECK NONE` (`test == ("NONE",)`) or `HEALTHCHECK [options] CMD ...`
    (`test` is `("CMD", argv...)` in exec form, `("CMD-SHELL", script)` in shell form).
    Durations are nanoseconds, 0 when not given (the runtime's default then applies)."""

    NAME: ClassVar[str] = "healthcheck"
    test: tuple[str, ...]
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OnbuildCommand(Command):
    """`ONBUILD <instruction>`: `expression` is the trigger's text (heredoc bodies appended),
    stored in the image for builds that use it as a base."""

    NAME: ClassVar[str] = "onbuild"
    expression: str
    trigger: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintainerCommand(Command):
    NAME: ClassVar[str] = "maintainer"
    maintainer: str


@dataclass(frozen=True, slots=True)
class Stage:
    """A build stage: its FROM and the commands after it, in order."""

    index: int
    from_: FromCommand
    commands: tuple[Command, ...]

    @property
    def name(self) -> str:
        """The stage's name (lower case), or "" for an unnamed stage."""
        return self.from_.stage_name

    @property
    def base(self) -> str:
        return self.from_.base


@dataclass(frozen=True, slots=True)
class Program:
    """A whole Dockerfile as typed instructions: the ARGs before the first FROM (the only
    variables FROM lines can use) and the stages. `warnings` are the parser's plus flags that
    were ignored."""

    file: str
    meta_args: tuple[ArgCommand, ...]
    stages: tuple[Stage, ...]
    escape: str = "\\"
    syntax: str | None = None
    warnings: tuple[ParseWarning, ...] = ()

    def stage(self, name_or_index: str | int) -> Stage:
        if isinstance(name_or_index, int):
            return self.stages[name_or_index]
        key = go_lower(name_or_index)
        for st in self.stages:
            if st.name == key:
                return st
        raise KeyError(name_or_index)


def check_chmod(chmod: str, cmd: Command | None = None) -> None:
    if not chmod or "$" in chmod:
        return
    error = f"invalid chmod parameter: '{chmod}'. it should be octal string and between 0 and 07777"
    try:
        mode = _values.parse_uint(chmod, 8, 32)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        if cmd is None:
            raise Problem(error, "--chmod")
        raise DockerfileInstructionError(error, cmd.span)
