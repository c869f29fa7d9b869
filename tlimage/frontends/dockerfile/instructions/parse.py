"""The untyped tree to typed instructions: each instruction's flags and arguments are checked
and shaped, and errors point at file:line:col with the line and a caret."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tlimage.frontends.dockerfile import _values
from tlimage.frontends.dockerfile._gostr import go_lower, go_quote, go_trim_space, go_upper
from tlimage.frontends.dockerfile.instructions.commands import (
    NETWORK_MODES,
    SECURITY_MODES,
    AddCommand,
    ArgCommand,
    ArgDef,
    CmdCommand,
    Command,
    CopyCommand,
    DockerfileInstructionError,
    EntrypointCommand,
    EnvCommand,
    ExposeCommand,
    FromCommand,
    HealthcheckCommand,
    KeyValuePair,
    LabelCommand,
    MaintainerCommand,
    OnbuildCommand,
    Program,
    RunCommand,
    ShellCommand,
    ShellInlineFile,
    SourceContent,
    Stage,
    StopSignalCommand,
    UserCommand,
    VolumeCommand,
    WorkdirCommand,
    check_chmod,
)
from tlimage.frontends.dockerfile.instructions.flags import Flags, suggest
from tlimage.frontends.dockerfile.parser import (
    Dockerfile,
    Heredoc,
    Instruction,
    ParseWarning,
    parse_heredoc,
)
from tlimage.frontends.mounts import parse_mount
from tlimage.frontends.problem import Problem
from tlimage.source import Span

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


# ------------------------------------------------------------------------------ per command


def _common(ins: Instruction, loc: _Loc) -> dict[str, object]:
    return {"keyword": ins.keyword, "span": loc.span(ins), "original": ins.original}


def _no_flags(ins: Instruction) -> None:
    Flags(ins.flags).parse()


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
    flags = Flags(ins.flags)
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
    flags = Flags(ins.flags)
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


def _copy_flags(
    ins: Instruction, name: str, extra: Callable[[Flags], None]
) -> tuple[Flags, tuple[str, ...], tuple[SourceContent, ...], str]:
    """What COPY and ADD share: the argument count, the flags both take (`--exclude`,
    `--chown`, `--chmod`, `--link`) plus those `extra` declares, the sources and the
    destination, and the `--chmod` check."""
    if len(ins.args) < 2:
        _sources_and_dest(ins, name)
    flags = Flags(ins.flags)
    flags.strings("exclude")
    flags.string("chown")
    flags.string("chmod")
    flags.bool("link")
    extra(flags)
    flags.parse()
    sources, contents, dest = _sources_and_dest(ins, name)
    check_chmod(flags["chmod"])
    return flags, sources, contents, dest


def _copy_only_flags(flags: Flags) -> None:
    flags.bool("parents")
    flags.string("from")


def _add_only_flags(flags: Flags) -> None:
    flags.bool("keep-git-dir")
    flags.string("checksum")
    flags.bool("unpack")


def _parse_copy(ins: Instruction, loc: _Loc) -> CopyCommand:
    flags, sources, contents, dest = _copy_flags(ins, "COPY", _copy_only_flags)
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
    flags, sources, contents, dest = _copy_flags(ins, "ADD", _add_only_flags)
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


def _opt_interval(flags: Flags, name: str) -> int:
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
    flags = Flags(ins.flags)
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
            f"unknown instruction: {ins.keyword}{suggest(ins.keyword, INSTRUCTIONS)}",
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
