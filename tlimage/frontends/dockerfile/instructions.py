"""Dockerfile parsing, stage two: the untyped tree to typed instructions (BuildKit's
`instructions` package).

Each instruction's flags are checked against the flags it accepts (an unknown, repeated or
valueless flag is an error, with a suggestion when one is close), its arguments are counted
and shaped (`FROM base AS name`, `COPY src... dest`, ENV pairs, HEALTHCHECK options), and
`RUN --mount` specs are parsed. Errors name file:line:col and show the line with a caret.

String fields hold the text as written: variables are not expanded and quotes in ENV/LABEL/ARG
values are still there. Expansion needs the build-time environment, so it belongs to lowering,
which calls `command.expand(expander)` (the fields BuildKit expands, per instruction) with
`shell.process_word` bound to the stage's variables. Values that contain `$` are validated
after expansion (`RunCommand.expand` re-parses its mounts); the rest are validated here.

Deliberately as BuildKit: ONBUILD keeps its trigger as text (it runs in a later build);
ARG, STOPSIGNAL and HEALTHCHECK NONE ignore flags (a `Program` warning says so); MAINTAINER is
accepted.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import ClassVar

from tlimage.errors import DockerfileError
from tlimage.frontends.dockerfile import _values
from tlimage.frontends.dockerfile._gostr import go_lower, go_quote, go_trim_space, go_upper
from tlimage.frontends.dockerfile.parser import (
    Dockerfile,
    Heredoc,
    Instruction,
    ParseWarning,
    parse_heredoc,
)
from tlimage.frontends.mounts import MountSpec as Mount
from tlimage.frontends.mounts import parse_mount
from tlimage.frontends.problem import Problem
from tlimage.source import Span

__all__ = [
    "AddCommand",
    "ArgCommand",
    "ArgDef",
    "CmdCommand",
    "Command",
    "CopyCommand",
    "DockerfileInstructionError",
    "EntrypointCommand",
    "EnvCommand",
    "ExposeCommand",
    "FromCommand",
    "HealthcheckCommand",
    "KeyValuePair",
    "LabelCommand",
    "MaintainerCommand",
    "Mount",
    "OnbuildCommand",
    "Program",
    "RunCommand",
    "ShellCommand",
    "ShellInlineFile",
    "SourceContent",
    "Stage",
    "StopSignalCommand",
    "UserCommand",
    "VolumeCommand",
    "WorkdirCommand",
    "parse_instruction",
    "parse_program",
]

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
        chmod = expander(self.chmod)
        _check_chmod(chmod, self)
        return replace(
            self,
            sources=_expand_all(expander, self.sources),
            dest=expander(self.dest),
            chown=expander(self.chown),
            chmod=chmod,
            excludes=_expand_all(expander, self.excludes),
        )


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
        chmod = expander(self.chmod)
        _check_chmod(chmod, self)
        return replace(
            self,
            sources=_expand_all(expander, self.sources),
            dest=expander(self.dest),
            chown=expander(self.chown),
            chmod=chmod,
            checksum=expander(self.checksum),
            excludes=_expand_all(expander, self.excludes),
        )


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


# ------------------------------------------------------------------------------ locations


class _Loc:
    """Turns a message about an instruction into an error pointing into the file."""

    def __init__(self, ast: Dockerfile) -> None:
        self.file = ast.file
        self.text = ast.text
        self.lines = ast.text.split("\n")

    def span(self, ins: Instruction) -> Span:
        return Span(self.file, ins.start_line, ins.col, ins.end_line, None)

    def error(
        self,
        ins: Instruction,
        message: str,
        needle: str | tuple[str, ...] | None = None,
        hint: str | None = None,
    ) -> DockerfileInstructionError:
        """The error, pointing at the first of `needle` (or of several, tried in order) found
        in the instruction's own lines, else at its keyword."""
        line, col, width = ins.start_line, ins.col, len(ins.keyword)
        last = max(ins.logical_end_line, ins.start_line)
        needles = (needle,) if isinstance(needle, str) else needle or ()
        found = False
        for want in needles:
            if not want:
                continue
            for ln in range(ins.start_line, min(last, len(self.lines)) + 1):
                text = self.lines[ln - 1]
                idx = text.find(want, ins.col - 1 if ln == ins.start_line else 0)
                if idx >= 0:
                    line, col, width = ln, idx + 1, len(want)
                    found = True
                    break
            if found:
                break
        span = Span(self.file, line, col, line, col + max(1, width))
        return DockerfileInstructionError(message, span, text=self.text, hint=hint)


def _suggest(value: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(go_lower(value), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# ---------------------------------------------------------------------------------- flags


class _Flags:
    """BuildKit's BFlags: declare what an instruction accepts, then `parse()` the raw flags.
    Boolean flags take no value or true/false; string flags need `=value`; `strings` flags
    may repeat."""

    def __init__(self, raw: tuple[str, ...]) -> None:
        self.raw = raw
        self.kinds: dict[str, str] = {}
        self.values: dict[str, object] = {}
        self.used: list[str] = []

    def bool(self, name: str, default: bool = False) -> None:
        self.kinds[name] = "bool"
        self.values[name] = default

    def string(self, name: str, default: str = "") -> None:
        self.kinds[name] = "string"
        self.values[name] = default

    def strings(self, name: str) -> None:
        self.kinds[name] = "strings"
        self.values[name] = []

    def parse(self) -> _Flags:
        for arg in self.raw:
            if not arg.startswith("--"):
                raise Problem(f"arg should start with -- : {arg}", arg)
            if arg == "--":
                break
            name, eq, value = arg[2:].partition("=")
            kind = self.kinds.get(name)
            needle = "--" + name
            if kind is None:
                raise Problem(f"unknown flag: {name}{_suggest(name, self.kinds)}", needle)
            if name in self.used and kind != "strings":
                raise Problem(f"duplicate flag specified: {name}", needle)
            self.used.append(name)
            if kind == "bool":
                if eq and value == "":
                    raise Problem(f"missing a value on flag: {name}", needle)
                lower = go_lower(value)
                if lower in ("", "true"):
                    self.values[name] = True
                elif lower == "false":
                    self.values[name] = False
                else:
                    raise Problem(f"expecting boolean value for flag {name}, not: {value}", needle)
            elif not eq:
                raise Problem(f"missing a value on flag: {name}", needle)
            elif kind == "string":
                self.values[name] = value
            else:
                self.values[name].append(value)  # type: ignore[attr-defined]
        return self

    def __getitem__(self, name: str):  # str, bool or list, as declared
        return self.values[name]


# ------------------------------------------------------------------------------ per command


def _common(ins: Instruction, loc: _Loc) -> dict[str, object]:
    return {"keyword": ins.keyword, "span": loc.span(ins), "original": ins.original}


def _no_flags(ins: Instruction) -> None:
    _Flags(ins.flags).parse()


def _exactly_one(ins: Instruction, name: str) -> str:
    if len(ins.args) != 1:
        raise Problem(f"{name} requires exactly one argument")
    return ins.args[0]


def _at_least_one(ins: Instruction, name: str) -> None:
    if not ins.args:
        raise Problem(f"{name} requires at least one argument")


def _json_args(ins: Instruction) -> tuple[str, ...]:
    """BuildKit's handleJSONArgs: exec form keeps the cells, shell form is one string."""
    if not ins.args:
        return ()
    if ins.json:
        return ins.args
    return (" ".join(ins.args),)


def _inline_files(ins: Instruction) -> tuple[ShellInlineFile, ...]:
    return tuple(ShellInlineFile(h.name, h.content, h.chomp) for h in ins.heredocs)


def _get_comment(comments: tuple[str, ...], name: str) -> str:
    if not name:
        return ""
    prefix = name + " "
    for line in comments:
        if line.startswith(prefix):
            return line[len(prefix) :]
    return ""


_STAGE_NAME = re.compile(r"[a-z][a-z0-9-_.]*\Z")


def _parse_from(ins: Instruction, loc: _Loc) -> FromCommand:
    args = ins.args
    name = ""
    if len(args) == 3 and go_lower(args[1]) == "as":
        name = go_lower(args[2])
        if not _STAGE_NAME.match(name):
            raise Problem(
                f"invalid name for build stage: {go_quote(args[2])}, name can't start with a "
                "number or contain symbols",
                args[2],
            )
    elif len(args) != 1:
        raise Problem("FROM requires either one or three arguments", args[1] if args[1:] else None)
    flags = _Flags(ins.flags)
    flags.string("platform")
    flags.parse()
    return FromCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        base=args[0],
        stage_name=name,
        platform=flags["platform"],
        comment=_get_comment(ins.comments, name),
    )


def _parse_run(ins: Instruction, loc: _Loc) -> RunCommand:
    flags = _Flags(ins.flags)
    flags.strings("mount")
    flags.string("network", "default")
    flags.string("security", "sandbox")
    flags.parse()
    specs = tuple(flags["mount"])
    mounts = tuple(parse_mount(spec, None) for spec in specs)
    network = flags["network"]
    if network not in NETWORK_MODES:
        raise Problem(f"invalid network mode {go_quote(network)}", "--network")
    security = flags["security"]
    if security not in SECURITY_MODES:
        raise Problem(f"security {go_quote(security)} is not valid", "--security")
    return RunCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        cmd=_json_args(ins),
        prepend_shell=not ins.json,
        files=_inline_files(ins),
        mounts=mounts,
        mount_specs=specs,
        network=network,
        security=security,
        flags_used=tuple(dict.fromkeys(flags.used)),
    )


def _parse_cmd(ins: Instruction, loc: _Loc) -> CmdCommand:
    _no_flags(ins)
    return CmdCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        cmd=_json_args(ins),
        prepend_shell=not ins.json,
        files=_inline_files(ins),
    )


def _parse_entrypoint(ins: Instruction, loc: _Loc) -> EntrypointCommand:
    _no_flags(ins)
    cmd = _json_args(ins)
    return EntrypointCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        cmd=cmd or None,
        prepend_shell=not ins.json,
        files=_inline_files(ins),
    )


def _parse_shell(ins: Instruction, loc: _Loc) -> ShellCommand:
    _no_flags(ins)
    shell = _json_args(ins)
    if not shell:
        raise Problem("SHELL requires at least one argument")
    if not ins.json:
        raise Problem(
            "SHELL requires the arguments to be in JSON form",
            ins.args[0][:20],
            hint='write it as SHELL ["/bin/bash", "-c"]',
        )
    return ShellCommand(**_common(ins, loc), shell=shell)  # type: ignore[arg-type]


def _sources_and_dest(
    ins: Instruction, name: str
) -> tuple[tuple[str, ...], tuple[SourceContent, ...], str]:
    if len(ins.args) < 2:
        raise Problem(
            f"{name} requires at least two arguments, but only one was provided. Destination "
            "could not be determined",
            ins.args[0] if ins.args else None,
        )
    *srcs, dest = ins.args
    if parse_heredoc(dest) is not None:
        raise Problem(f"{name} cannot accept a heredoc as a destination", dest)
    lookup: dict[str, Heredoc] = {h.name: h for h in ins.heredocs}
    paths: list[str] = []
    contents: list[SourceContent] = []
    for src in srcs:
        marker = parse_heredoc(src)
        if marker is None:
            paths.append(src)
            continue
        doc = lookup.get(marker.name)
        data = doc.content if doc is not None else ""
        if marker.chomp:
            data = re.sub(r"(?m)^\t+", "", data)
        contents.append(SourceContent(marker.name, data, marker.expand))
    return tuple(paths), tuple(contents), dest


def _check_chmod(chmod: str, cmd: Command | None = None) -> None:
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


def _parse_copy(ins: Instruction, loc: _Loc) -> CopyCommand:
    if len(ins.args) < 2:
        _sources_and_dest(ins, "COPY")
    flags = _Flags(ins.flags)
    flags.strings("exclude")
    flags.bool("parents")
    flags.string("chown")
    flags.string("from")
    flags.string("chmod")
    flags.bool("link")
    flags.parse()
    sources, contents, dest = _sources_and_dest(ins, "COPY")
    _check_chmod(flags["chmod"])
    return CopyCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        sources=sources,
        contents=contents,
        dest=dest,
        from_=flags["from"],
        chown=flags["chown"],
        chmod=flags["chmod"],
        link=flags["link"],
        parents=flags["parents"],
        excludes=tuple(flags["exclude"]),
    )


def _parse_add(ins: Instruction, loc: _Loc) -> AddCommand:
    if len(ins.args) < 2:
        _sources_and_dest(ins, "ADD")
    flags = _Flags(ins.flags)
    flags.strings("exclude")
    flags.string("chown")
    flags.string("chmod")
    flags.bool("link")
    flags.bool("keep-git-dir")
    flags.string("checksum")
    flags.bool("unpack")
    flags.parse()
    sources, contents, dest = _sources_and_dest(ins, "ADD")
    _check_chmod(flags["chmod"])
    checksum = flags["checksum"]
    if checksum and len(sources) + len(contents) != 1:
        raise Problem("checksum can't be specified for multiple sources", "--checksum")
    return AddCommand(
        **_common(ins, loc),  # type: ignore[arg-type]
        sources=sources,
        contents=contents,
        dest=dest,
        chown=flags["chown"],
        chmod=flags["chmod"],
        link=flags["link"],
        keep_git_dir=flags["keep-git-dir"],
        checksum=checksum,
        excludes=tuple(flags["exclude"]),
        unpack=flags["unpack"] if "unpack" in flags.used else None,
    )


def _kv_pairs(ins: Instruction, name: str) -> tuple[KeyValuePair, ...]:
    args = ins.args
    if not args:
        raise Problem(f"{name} requires at least one argument")
    if len(args) % 3 != 0:
        raise Problem(f"Bad input to {name}, too many arguments")
    out = []
    for j in range(0, len(args), 3):
        key, value, delim = args[j : j + 3]
        if not key:
            raise Problem(f"{name} names can not be blank", "=" + value if delim else None)
        out.append(KeyValuePair(key, value, delim == ""))
    return tuple(out)


def _parse_env(ins: Instruction, loc: _Loc) -> EnvCommand:
    _no_flags(ins)
    return EnvCommand(**_common(ins, loc), env=_kv_pairs(ins, "ENV"))  # type: ignore[arg-type]


def _parse_label(ins: Instruction, loc: _Loc) -> LabelCommand:
    _no_flags(ins)
    return LabelCommand(**_common(ins, loc), labels=_kv_pairs(ins, "LABEL"))  # type: ignore[arg-type]


def _parse_arg(ins: Instruction, loc: _Loc) -> ArgCommand:
    if not ins.args:
        raise Problem("ARG requires at least one argument")
    # As BuildKit: ARG does not look at flags (parse_program warns about them).
    defs = []
    for arg in ins.args:
        key, eq, value = arg.partition("=")
        if eq and not key:
            raise Problem("ARG names can not be blank", arg)
        defs.append(ArgDef(key, value if eq else None, _get_comment(ins.comments, key)))
    return ArgCommand(**_common(ins, loc), args=tuple(defs))  # type: ignore[arg-type]


def _parse_workdir(ins: Instruction, loc: _Loc) -> WorkdirCommand:
    path = _exactly_one(ins, "WORKDIR")
    _no_flags(ins)
    return WorkdirCommand(**_common(ins, loc), path=path)  # type: ignore[arg-type]


def _parse_user(ins: Instruction, loc: _Loc) -> UserCommand:
    user = _exactly_one(ins, "USER")
    _no_flags(ins)
    return UserCommand(**_common(ins, loc), user=user)  # type: ignore[arg-type]


def _parse_expose(ins: Instruction, loc: _Loc) -> ExposeCommand:
    _at_least_one(ins, "EXPOSE")
    _no_flags(ins)
    ports = tuple(sorted(ins.args, key=lambda p: p.encode("utf-8", "surrogateescape")))
    return ExposeCommand(**_common(ins, loc), ports=ports)  # type: ignore[arg-type]


def _parse_volume(ins: Instruction, loc: _Loc) -> VolumeCommand:
    _at_least_one(ins, "VOLUME")
    _no_flags(ins)
    volumes = []
    for v in ins.args:
        v = go_trim_space(v)
        if v == "":
            raise Problem("VOLUME specified can not be an empty string")
        volumes.append(v)
    return VolumeCommand(**_common(ins, loc), volumes=tuple(volumes))  # type: ignore[arg-type]


def _parse_stopsignal(ins: Instruction, loc: _Loc) -> StopSignalCommand:
    # As BuildKit: STOPSIGNAL does not look at flags.
    sig = _exactly_one(ins, "STOPSIGNAL")
    return StopSignalCommand(**_common(ins, loc), signal=sig)  # type: ignore[arg-type]


def _parse_maintainer(ins: Instruction, loc: _Loc) -> MaintainerCommand:
    who = _exactly_one(ins, "MAINTAINER")
    _no_flags(ins)
    return MaintainerCommand(**_common(ins, loc), maintainer=who)  # type: ignore[arg-type]


def _opt_interval(flags: _Flags, name: str) -> int:
    text = flags[name]
    if text == "":
        return 0
    try:
        d = _values.parse_duration(text)
    except ValueError as e:
        raise Problem(str(e), "--" + name) from None
    if d == 0:
        return 0
    if d < 1_000_000:
        raise Problem(f'Interval "{name}" cannot be less than 1ms', "--" + name)
    return d


def _parse_healthcheck(ins: Instruction, loc: _Loc) -> HealthcheckCommand:
    _at_least_one(ins, "HEALTHCHECK")
    typ = go_upper(ins.args[0])
    rest = ins.args[1:]
    common = _common(ins, loc)
    if typ == "NONE":
        # As BuildKit: flags are not looked at for NONE.
        if rest:
            raise Problem("HEALTHCHECK NONE takes no arguments", rest[0][:20])
        return HealthcheckCommand(**common, test=("NONE",))  # type: ignore[arg-type]
    flags = _Flags(ins.flags)
    flags.string("interval")
    flags.string("timeout")
    flags.string("start-period")
    flags.string("start-interval")
    flags.string("retries")
    flags.parse()
    if typ != "CMD":
        raise Problem(f"Unknown type {go_quote(typ)} in HEALTHCHECK (try CMD)", ins.args[0])
    if not rest:
        raise Problem("Missing command after HEALTHCHECK CMD", ins.args[0])
    cmd = rest if ins.json else (" ".join(rest),)
    test = ("CMD" if ins.json else "CMD-SHELL", *cmd)
    retries = 0
    if flags["retries"] != "":
        try:
            retries = _values.parse_int(flags["retries"], 32)
        except ValueError as e:
            raise Problem(str(e), "--retries") from None
        if retries < 0:
            raise Problem(f"--retries cannot be negative ({retries})", "--retries")
    return HealthcheckCommand(
        **common,  # type: ignore[arg-type]
        test=test,
        interval=_opt_interval(flags, "interval"),
        timeout=_opt_interval(flags, "timeout"),
        start_period=_opt_interval(flags, "start-period"),
        start_interval=_opt_interval(flags, "start-interval"),
        retries=retries,
    )


_ONBUILD_PREFIX = re.compile(r"(?i)^[\t\n\f\r ]*ONBUILD[\t\n\f\r ]*")


def _parse_onbuild(ins: Instruction, loc: _Loc) -> OnbuildCommand:
    if ins.sub is None:
        raise Problem("ONBUILD requires at least one argument")
    _no_flags(ins)
    trigger = go_upper(go_trim_space(ins.sub.keyword))
    if trigger == "ONBUILD":
        raise Problem("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed", ins.sub.keyword)
    if trigger in ("MAINTAINER", "FROM"):
        raise Problem(f"{trigger} isn't allowed as an ONBUILD trigger", ins.sub.keyword)
    expression = _ONBUILD_PREFIX.sub("", ins.original, count=1)
    for doc in ins.heredocs:
        expression += "\n" + doc.content + doc.name
    return OnbuildCommand(**_common(ins, loc), expression=expression, trigger=trigger)  # type: ignore[arg-type]


_PARSERS: dict[str, Callable[[Instruction, _Loc], Command]] = {
    "add": _parse_add,
    "arg": _parse_arg,
    "cmd": _parse_cmd,
    "copy": _parse_copy,
    "entrypoint": _parse_entrypoint,
    "env": _parse_env,
    "expose": _parse_expose,
    "from": _parse_from,
    "healthcheck": _parse_healthcheck,
    "label": _parse_label,
    "maintainer": _parse_maintainer,
    "onbuild": _parse_onbuild,
    "run": _parse_run,
    "shell": _parse_shell,
    "stopsignal": _parse_stopsignal,
    "user": _parse_user,
    "volume": _parse_volume,
    "workdir": _parse_workdir,
}
INSTRUCTIONS = tuple(sorted(_PARSERS))


# ---------------------------------------------------------------------------------- entry


def parse_instruction(ins: Instruction, ast: Dockerfile) -> Command:
    """The typed form of one parsed instruction. Raises `DockerfileInstructionError`."""
    loc = _Loc(ast)
    return _parse_one(ins, loc)


def _parse_one(ins: Instruction, loc: _Loc) -> Command:
    parser = _PARSERS.get(ins.command)
    if parser is None:
        raise loc.error(
            ins,
            f"unknown instruction: {ins.keyword}{_suggest(ins.keyword, INSTRUCTIONS)}",
            ins.keyword,
        )
    try:
        return parser(ins, loc)
    except Problem as e:
        raise loc.error(ins, e.message, e.needle, e.hint) from None


@dataclass
class _StageBuilder:
    index: int
    from_: FromCommand
    commands: list[Command] = field(default_factory=list)


def parse_program(ast: Dockerfile) -> Program:
    """All instructions typed and grouped into stages. Instructions other than ARG before the
    first FROM, and a stage name used twice, are errors."""
    loc = _Loc(ast)
    meta_args: list[ArgCommand] = []
    stages: list[_StageBuilder] = []
    seen_names: dict[str, Span] = {}
    warnings = list(ast.warnings)
    for ins in ast.instructions:
        cmd = _parse_one(ins, loc)
        ignores_flags = isinstance(cmd, ArgCommand | StopSignalCommand) or (
            isinstance(cmd, HealthcheckCommand) and cmd.test == ("NONE",)
        )
        if ins.flags and ignores_flags:
            warnings.append(
                ParseWarning(
                    f"{ins.keyword} ignores flags, as BuildKit does: {' '.join(ins.flags)}",
                    ins.start_line,
                )
            )
        if isinstance(cmd, FromCommand):
            if cmd.stage_name:
                if cmd.stage_name in seen_names:
                    first = seen_names[cmd.stage_name]
                    raise loc.error(
                        ins,
                        f"duplicate stage name {go_quote(cmd.stage_name)} (first defined on "
                        f"line {first.line})",
                        ins.args[2],
                    )
                seen_names[cmd.stage_name] = cmd.span
            stages.append(_StageBuilder(len(stages), cmd))
        elif not stages:
            if isinstance(cmd, ArgCommand):
                meta_args.append(cmd)
            else:
                raise loc.error(
                    ins,
                    "no build stage in current context",
                    ins.keyword,
                    hint="a Dockerfile starts with FROM (only ARG may come before it)",
                )
        else:
            stages[-1].commands.append(cmd)
    return Program(
        file=ast.file,
        meta_args=tuple(meta_args),
        stages=tuple(Stage(s.index, s.from_, tuple(s.commands)) for s in stages),
        escape=ast.escape,
        syntax=ast.directive("syntax"),
        warnings=tuple(warnings),
    )
