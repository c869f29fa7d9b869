"""Dockerfile parsing, stage three: typed instructions to the IR (BuildKit's `dockerfile2llb`).

What BuildKit decides at dispatch time is decided here, so the IR holds plain values:

- ARG scoping. ARGs before the first FROM (meta ARGs), together with the automatic platform
  ARGs (`TARGETARCH`, `BUILDPLATFORM`, ...), are visible to FROM lines only; a stage sees one
  once it declares it again (`ARG NAME` without a default takes the meta value). A
  `--build-arg` overrides a default. Each `Arg` step records the value in effect, so other
  build args give other digests.
- Word expansion of the fields BuildKit expands (`Command.expand`), with the stage's
  variables: the base image's ENV, then ARG and ENV values in order, the latest write winning
  (BuildKit's LLB state env). RUN, CMD, ENTRYPOINT, SHELL and HEALTHCHECK are not expanded:
  the shell does that when they run.
- Stages. `FROM <earlier stage>` continues that stage (variables, working directory) and
  runs its ONBUILD triggers first; `COPY --from=` names a stage, a stage index or else a
  registered image; stage names are case-insensitive. Unnamed stages are called `stage-N`
  (`main` when it is the only stage). The target is `target=` or the last stage.
- WORKDIR resolves against the previous one here, so the IR holds absolute paths.

Stages the target does not need are lowered and kept (the IR skips them when building). As in
BuildKit, which never dispatches them, an error inside such a stage does not fail the build:
that stage, and any stage that reads from it, is left out of the result.

Not here: choosing the build context and its `.dockerignore` (the builder's job), and the
config of registered base images: the seed bases' environment is known, other images are
assumed to have the default PATH unless `resolve_base` says more.
"""

from __future__ import annotations

import difflib
import platform as _platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tlimage import ir
from tlimage.errors import DockerfileError, TlimageError
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile.instructions import (
    DockerfileInstructionError,
    parse_instruction,
    parse_program,
)
from tlimage.frontends.dockerfile.lower_base import Problem, StageInfo, StageTable
from tlimage.frontends.dockerfile.lower_config import (
    lower_expose,
    lower_healthcheck,
    lower_stopsignal,
    normalize_workdir,
)
from tlimage.frontends.dockerfile.lower_copy import lower_add, lower_copy, raw_expander
from tlimage.frontends.dockerfile.lower_run import lower_run
from tlimage.frontends.dockerfile.parser import Dockerfile, parse, parse_file
from tlimage.frontends.dockerfile.shell import ShellError, ShellLex
from tlimage.source import Span

__all__ = [
    "BaseImage",
    "compile_dockerfile",
    "default_image_name",
    "load_dockerfile_image",
    "lower_program",
    "platform_args",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class BaseImage:
    """What lowering needs of a base image: the variables its steps start with (for word
    expansion: `ENV PATH=/opt/bin:$PATH`) and its working directory (for a relative WORKDIR).
    The default is what BuildKit assumes of an image without config: PATH set, `/`."""

    env: ir.steps.Pairs = (("PATH", DEFAULT_PATH),)
    workdir: str = "/"
    onbuild: tuple[str, ...] = ()  # the image's ONBUILD triggers, run at the start of the stage


# The seed bases' image config (tlimage/executor/catalog.py; a unit test keeps the two equal).
_DEB = BaseImage(env=(("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8"),
                      ("PIP_BREAK_SYSTEM_PACKAGES", "1")))  # fmt: skip
SEED_BASES: Mapping[str, BaseImage] = {
    "busybox": BaseImage(),
    **{
        f"{dist}-{variant}": _DEB
        for dist in ("debian", "ubuntu")
        for variant in ("minimal", "systemd", "vnc")
    },
}

BaseResolver = Callable[[str], "BaseImage | None"]


# ---------------------------------------------------------------------------------- entry


def load_dockerfile_image(
    path: Path | str,
    *,
    build_args: Mapping[str, str] | None = None,
    target: str | None = None,
    name: str | None = None,
    resolve_base: BaseResolver | None = None,
) -> ir.ImageDef:
    """The image a Dockerfile defines: its target stage and every other stage, registered as
    `name` (default: from the file, see `default_image_name`) with tag `latest`.
    Raises `DockerfileError` (file:line:col, the line and a caret) for any mistake."""
    p = Path(path)
    if name is not None and not _NAME_RE.fullmatch(name):
        raise TlimageError(
            f"invalid image name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
            "starting with a letter or digit)"
        )
    ast = parse_file(str(p))
    return lower_program(
        parse_program(ast),
        ast,
        name=name if name is not None else default_image_name(p),
        build_args=build_args,
        target=target,
        resolve_base=resolve_base,
    )


def compile_dockerfile(
    source: str | bytes,
    file: str = "Dockerfile",
    *,
    name: str = "dockerfile",
    build_args: Mapping[str, str] | None = None,
    target: str | None = None,
    resolve_base: BaseResolver | None = None,
) -> ir.ImageDef:
    """`load_dockerfile_image` for Dockerfile text that is not (or not only) in a file."""
    ast = parse(source, file)
    return lower_program(
        parse_program(ast),
        ast,
        name=name,
        build_args=build_args,
        target=target,
        resolve_base=resolve_base,
    )


_NAME_JUNK = re.compile(r"[^A-Za-z0-9._-]+")


def default_image_name(path: Path) -> str:
    """`X` for `X.Dockerfile`, `Dockerfile.X` (and the Containerfile spellings), else the
    name of the folder holding the file; made a valid image name (other characters become
    `-`, a leading `.`, `_` or `-` is dropped)."""
    name = path.name
    low = name.lower()
    stem = name
    for word in ("dockerfile", "containerfile"):
        if low == word:
            stem = ""
        elif low.startswith(word + "."):
            stem = name[len(word) + 1 :]
        elif low.endswith(word):
            stem = name[: -len(word)]
        else:
            continue
        break

    def clean(text: str) -> str:
        return _NAME_JUNK.sub("-", text).lstrip("._-").rstrip("._-")[:128]

    return clean(stem) or clean(path.resolve().parent.name) or "image"


def platform_args() -> dict[str, str]:
    """BuildKit's automatic platform ARGs for a build on this machine, for this machine (the
    microVM runs the host's architecture)."""
    machine = _platform.machine().lower()
    arch, variant = {
        "x86_64": ("amd64", ""),
        "amd64": ("amd64", ""),
        "aarch64": ("arm64", ""),
        "arm64": ("arm64", ""),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", ""),
        "i686": ("386", ""),
    }.get(machine, (machine, ""))
    plat = "linux/" + arch + (f"/{variant}" if variant else "")
    out: dict[str, str] = {}
    for side in ("BUILD", "TARGET"):
        out |= {f"{side}PLATFORM": plat, f"{side}OS": "linux", f"{side}ARCH": arch,
                f"{side}VARIANT": variant}  # fmt: skip
    return out


# ------------------------------------------------------------------------------- lowering


# The flag whose value `Command.expand` checks, per instruction (errors point at it).
_EXPAND_FLAG: dict[type, str] = {
    ins.RunCommand: "--mount",
    ins.CopyCommand: "--chmod",
    ins.AddCommand: "--chmod",
}


class _DependencyFailed(Exception):
    """A stage reads from a stage that failed to lower; it fails with that stage's error."""

    def __init__(self, error: DockerfileError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Scope:
    """One stage's dispatch state."""

    info: StageInfo
    env: dict[str, str]  # what words expand with: base ENV, then ARGs and ENVs as they come
    workdir: str
    onbuild: list[str] = field(default_factory=list)  # triggers for stages built FROM this one
    steps: list[ir.Step] = field(default_factory=list)
    meta: list[ir.StepMeta] = field(default_factory=list)


def lower_program(
    program: ins.Program,
    ast: Dockerfile,
    *,
    name: str,
    build_args: Mapping[str, str] | None = None,
    target: str | None = None,
    resolve_base: BaseResolver | None = None,
) -> ir.ImageDef:
    """The typed program as an `ImageDef` (see the module docstring for the rules)."""
    return _Lowering(program, ast, build_args or {}, resolve_base).image(name, target)


class _Lowering:
    def __init__(
        self,
        program: ins.Program,
        ast: Dockerfile,
        build_args: Mapping[str, str],
        resolve_base: BaseResolver | None,
    ) -> None:
        self.program = program
        self.file = ast.file
        self.text = ast.text
        self.lines = ast.text.split("\n")
        self.lex = ShellLex(program.escape)
        self._special = re.compile("[$'\"" + re.escape(program.escape) + "]")
        self.build_args = dict(build_args)
        self.resolve_base = resolve_base
        self.table = StageTable(program.stages)
        self.scopes: dict[int, _Scope] = {}
        self.failed: dict[int, DockerfileError] = {}
        self.global_args = self._meta_args()

    # -- the whole image ------------------------------------------------------------------

    def image(self, name: str, target: str | None) -> ir.ImageDef:
        # As BuildKit: every FROM line is expanded before the target is looked up, so a bad
        # base fails the build even in a stage the target does not need.
        bases = [self._base(st.from_) for st in self.program.stages]
        target_info = self._target(target)
        lowered: dict[int, ir.Stage] = {}
        for st, (base, platform) in zip(self.program.stages, bases, strict=True):
            try:
                lowered[st.index] = self._stage(st, base, platform)
            except _DependencyFailed as e:
                self.failed[st.index] = e.error
            except DockerfileError as e:
                self.failed[st.index] = e
        by_ir_name = {s.ir_name: s.index for s in self.table.stages}

        def refs(index: int) -> list[int]:
            stage = lowered.get(index)
            if stage is None:
                return []
            return [by_ir_name[r] for r in stage.stage_refs() if r in by_ir_name]

        needed: set[int] = set()
        todo = [target_info.index]
        while todo:
            i = todo.pop()
            if i not in needed:
                needed.add(i)
                todo.extend(refs(i))
        broken = sorted(needed & self.failed.keys())
        if broken:
            raise self.failed[broken[0]]
        dropped = set(self.failed)
        for i in sorted(lowered):  # references only point to earlier stages
            if any(r in dropped for r in refs(i)):
                dropped.add(i)
        return ir.ImageDef(
            name=name,
            stages=tuple(s for i, s in sorted(lowered.items()) if i not in dropped),
            tag="latest",
            target=target_info.ir_name if target is not None else None,
        )

    def _target(self, target: str | None) -> StageInfo:
        if not self.table.stages:
            from tlimage.source import Span

            raise DockerfileError("this Dockerfile has no FROM instruction: it defines no stage "
                                  "to build", Span(self.file, 1, 1),
                                  hint="start a stage with `FROM <image>`")  # fmt: skip
        if target is None:
            return self.table.stages[-1]
        found = self.table.by_name(target)
        if found is None:
            names = self.table.names()
            close = difflib.get_close_matches(target.lower(), names, n=1)
            message = f'{self.file}: target stage "{target}" could not be found'
            if close:
                message += f" (did you mean {close[0]}?)"
            hint = (
                f"the named stages are: {', '.join(names)}"
                if names
                else "this Dockerfile names no stages (FROM image AS name)"
            )
            raise DockerfileError(message, None, hint=hint)
        return found

    def _meta_args(self) -> dict[str, str]:
        """The variables FROM lines see: the platform ARGs, then the meta ARGs in order; a
        build arg overrides either."""
        env = platform_args()
        for key in env:
            if key in self.build_args:
                env[key] = self.build_args[key]
        for cmd in self.program.meta_args:
            for arg in cmd.args:
                if arg.key in self.build_args:
                    env[arg.key] = self.build_args[arg.key]
                elif arg.value is not None:
                    env[arg.key] = self._expand(arg.value, env, cmd)
        return env

    # -- one stage ------------------------------------------------------------------------

    def _base(self, frm: ins.FromCommand) -> tuple[str, str | None]:
        """The FROM line's base and platform, expanded with the meta ARGs."""
        base = self._expand(frm.base, self.global_args, frm)
        if base == "":
            raise self._error(frm, f"base name ({frm.base}) should not be blank", frm.base)
        if not frm.platform:
            return base, None
        platform = self._expand(frm.platform, self.global_args, frm)
        if platform == "":
            raise self._error(
                frm, f"empty platform value from expression {frm.platform}", "--platform"
            )
        return base, platform

    def _stage(self, st: ins.Stage, base: str, platform: str | None) -> ir.Stage:
        info = self.table.stages[st.index]
        frm = st.from_
        parent = self.table.by_name(base)
        triggers: list[str] = []
        if parent is not None and parent.index < st.index:
            if parent.index in self.failed:
                raise _DependencyFailed(self.failed[parent.index])
            up = self.scopes[parent.index]
            scope = _Scope(info, dict(up.env), up.workdir)
            triggers = up.onbuild
            first: ir.From = ir.From(stage=parent.ir_name, platform=platform)
        else:
            image, _, pin = base.partition("@")
            # The resolver gets the whole reference (a digest pins a registry image).
            known = (self.resolve_base(base) if self.resolve_base else None) or SEED_BASES.get(
                image, BaseImage()
            )
            triggers = list(known.onbuild)
            env = dict(known.env)
            env.setdefault("PATH", DEFAULT_PATH)  # BuildKit makes sure PATH is always set
            scope = _Scope(info, env, known.workdir or "/")
            first = ir.From(image=image, pin=pin or None, platform=platform)
        self.scopes[st.index] = scope  # children see it only if this stage lowers
        try:
            self._add(scope, first, frm)
            for expression in triggers:
                self._command(scope, self._trigger(expression, frm), frm)
            for cmd in st.commands:
                self._command(scope, cmd, cmd)
        except Exception:
            del self.scopes[st.index]
            raise
        return ir.Stage(info.ir_name, tuple(scope.steps), tuple(scope.meta))

    def _trigger(self, expression: str, frm: ins.FromCommand) -> ins.Command:
        """An ONBUILD trigger of the parent stage, parsed as the instruction it holds."""
        try:
            ast = parse(expression, self.file)
            if len(ast.instructions) != 1:
                raise self._error(frm, "onbuild trigger should be a single expression")
            return parse_instruction(ast.instructions[0], ast)
        except DockerfileError as e:
            if e.span is not None and e.span.file == self.file and e.text == self.text:
                raise
            raise self._error(frm, f"ONBUILD trigger {expression!r}: {e.message}") from None

    # -- one instruction ------------------------------------------------------------------

    def _command(self, scope: _Scope, cmd: ins.Command, where: ins.Command) -> None:
        """Lower `cmd` into `scope`. `where` is the instruction errors and spans point at:
        `cmd` itself, or the FROM line for a parent stage's ONBUILD trigger."""
        trigger = where is not cmd
        try:
            if isinstance(cmd, ins.ArgCommand):
                self._arg(scope, cmd, where)
                return
            cmd = cmd.expand(self._expander(scope.env, where))
            step = self._step(scope, cmd)
        except Problem as p:
            err = self._error(where, p.message, None if trigger else p.needle, hint=p.hint)
        except DockerfileError as e:
            if e.text is not None and not trigger:
                raise
            # `Command.expand` knows the instruction's span only; point at the flag it checks.
            needle = _EXPAND_FLAG.get(type(cmd)) if not trigger else None
            err = self._error(where, e.message, needle, hint=e.hint)
        else:
            self._add(scope, step, where)
            return
        if trigger:
            err.hint = f"the parent stage's ONBUILD trigger `{cmd.original}` runs here"
        raise err

    def _step(self, scope: _Scope, cmd: ins.Command) -> ir.Step:
        if isinstance(cmd, ins.RunCommand):
            return lower_run(cmd, scope.workdir, lambda ref: self._source(scope, ref, "mount"))
        if isinstance(cmd, ins.CopyCommand):
            return lower_copy(
                cmd, lambda ref: self._source(scope, ref, "copy"), raw_expander(scope.env)
            )
        if isinstance(cmd, ins.AddCommand):
            return lower_add(cmd, raw_expander(scope.env))
        if isinstance(cmd, ins.EnvCommand):
            pairs = tuple((p.key, p.value) for p in cmd.env)
            scope.env.update(pairs)
            return ir.Env(vars=pairs)
        if isinstance(cmd, ins.LabelCommand):
            return ir.Label(labels=tuple((p.key, p.value) for p in cmd.labels))
        if isinstance(cmd, ins.MaintainerCommand):
            return ir.Label(labels=(("maintainer", cmd.maintainer),))
        if isinstance(cmd, ins.WorkdirCommand):
            scope.workdir = normalize_workdir(scope.workdir, cmd.path)
            return ir.Workdir(path=scope.workdir)
        if isinstance(cmd, ins.UserCommand):
            return ir.User(user=cmd.user)
        if isinstance(cmd, ins.ExposeCommand):
            return lower_expose(cmd)
        if isinstance(cmd, ins.VolumeCommand):
            if "" in cmd.volumes:
                raise Problem("VOLUME specified can not be an empty string")
            return ir.Volume(paths=cmd.volumes)
        if isinstance(cmd, ins.StopSignalCommand):
            return lower_stopsignal(cmd)
        if isinstance(cmd, ins.HealthcheckCommand):
            return lower_healthcheck(cmd)
        if isinstance(cmd, ins.ShellCommand):
            return ir.Shell(argv=cmd.shell)
        if isinstance(cmd, ins.CmdCommand):
            if cmd.prepend_shell:
                return ir.Cmd(command=cmd.cmd or ("",), shell=True)
            return ir.Cmd(command=cmd.cmd, shell=False)
        if isinstance(cmd, ins.EntrypointCommand):
            if cmd.cmd is None:  # ENTRYPOINT []
                return ir.Entrypoint(command=(), shell=False)
            return ir.Entrypoint(command=cmd.cmd or ("",), shell=cmd.prepend_shell)
        if isinstance(cmd, ins.OnbuildCommand):
            scope.onbuild.append(cmd.expression)
            return ir.Onbuild(instruction=cmd.expression)
        raise Problem(f"{cmd.keyword} cannot be used here")  # FROM is a stage, not a command

    def _arg(self, scope: _Scope, cmd: ins.ArgCommand, where: ins.Command) -> None:
        """BuildKit's dispatchArg: a build arg wins, then the default (expanded), then the
        meta ARG of the same name; a value, once known, is a variable of the stage."""
        for arg in cmd.args:
            if arg.key in self.build_args:
                value: str | None = self.build_args[arg.key]
            elif arg.value is not None:
                value = self._expand(arg.value, scope.env, where)
            else:
                value = self.global_args.get(arg.key)
            if value is not None:
                scope.env[arg.key] = value
            self._add(scope, ir.Arg(name=arg.key, default=value), where)

    def _source(self, scope: _Scope, ref: str, what: str) -> str:
        """The IR name `COPY --from=ref` or `--mount=from=ref` reads from: a stage defined
        before this one, or else an image name as written."""
        if what == "copy":
            try:
                literal = self.lex.process_word(ref, {}) == ref
            except ShellError:
                literal = False
            if not literal:
                raise Problem(
                    "variable expansion is not supported for --from, define a new stage with "
                    "FROM using ARG from global scope as a workaround",
                    "--from",
                )
        found = self.table.lookup(ref, by_index=what == "copy")
        if found is None:
            return ref
        if found.index >= scope.info.index:
            raise Problem(
                f'cannot {what} from stage "{ref}", it needs to be defined before current stage '
                f'"{scope.info.ir_name}"',
                "--from" if what == "copy" else ref,
            )
        if found.index in self.failed:
            raise _DependencyFailed(self.failed[found.index])
        return found.ir_name

    # -- helpers --------------------------------------------------------------------------

    def _add(self, scope: _Scope, step: ir.Step, where: ins.Command) -> None:
        scope.steps.append(step)
        scope.meta.append(ir.StepMeta(span=self._span(where)))

    def _span(self, cmd: ins.Command) -> Span:
        """The instruction's lines, heredoc bodies included; the end column is exclusive."""
        s = cmd.span
        end_line = s.end_line or s.line
        last = self.lines[end_line - 1] if 0 < end_line <= len(self.lines) else ""
        return Span(self.file, s.line, s.col, end_line, len(last) + 1)

    def _expand(self, word: str, env: Mapping[str, str], where: ins.Command) -> str:
        # Without `$`, quotes or the escape token the lexer gives the word back unchanged.
        if not self._special.search(word):
            return word
        try:
            return self.lex.process_word(word, env)
        except ShellError as e:
            raise self._error(where, e.message, word, cls=ShellError) from None

    def _expander(self, env: Mapping[str, str], where: ins.Command) -> Callable[[str], str]:
        return lambda word: self._expand(word, env, where)

    def _error(
        self,
        cmd: ins.Command,
        message: str,
        needle: str | tuple[str, ...] | None = None,
        *,
        cls: type[DockerfileError] = DockerfileInstructionError,
        hint: str | None = None,
    ) -> DockerfileError:
        """An error at the first of `needle` found in the instruction's lines, else at its
        keyword."""
        s = cmd.span
        line, col, width = s.line, s.col, len(cmd.keyword)
        wants = (needle,) if isinstance(needle, str) else needle or ()
        last = min(s.end_line or s.line, len(self.lines))
        for want in wants:
            hit = None
            if want:
                for ln in range(s.line, last + 1):
                    idx = self.lines[ln - 1].find(want, s.col - 1 if ln == s.line else 0)
                    if idx >= 0:
                        hit = (ln, idx + 1, len(want))
                        break
            if hit:
                line, col, width = hit
                break
        span = Span(self.file, line, col, line, col + max(1, width))
        return cls(message, span, text=self.text, hint=hint)
