"""The Python DSL: `Image("data-tools").run("pip install pandas").env("APP_ENV", "prod")`.

Compatible with the Tensorlake image API (`run`, `copy`, `add`, `env`, `workdir`, `cmd`,
`entrypoint`, same signatures) and extended to every IR step. Unlike Tensorlake's, builders never
mutate: each call returns a new `Image` wrapping the old one's steps, so a shared base can be
extended in several directions. An empty call (`run([])`, `pip_install()`) adds no step.

Every step records the user's call site (file:line), which errors — here, or a failing RUN much
later in the build — point at.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tlimage import ir
from tlimage.errors import DSLError
from tlimage.source import Span

DEFAULT_BASE_IMAGE = "debian-minimal"
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
ENV_KEY_RE = re.compile(r"[^=\s]+")
PORT_RE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp|sctp))?", re.IGNORECASE)


def call_site() -> Span | None:
    """The first frame outside the tlimage package: the user's line that made the call."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        full = os.path.abspath(filename)
        if not full.startswith(_PKG_DIR + os.sep):
            return Span(_display_path(full), frame.f_lineno)
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _display_path(full: str) -> str:
    """Paths under the working directory are shown relative to it, as a user would type them."""
    cwd = os.getcwd()
    return os.path.relpath(full, cwd) if full.startswith(cwd + os.sep) else full


def _fail(message: str, site: Span | None, hint: str | None = None) -> DSLError:
    """A DSLError at the user's call site, naming the Image method that was called."""
    method = None
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        if frame.f_code.co_name in _PUBLIC_METHODS:
            method = frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    if method is not None:
        message = f"{'Image' if method == '__init__' else method}(): {message}"
    return DSLError(message, site.short if site else None, hint=hint, span=site)


@dataclass(frozen=True, slots=True)
class _Op:
    step: ir.Step
    meta: ir.StepMeta


T = TypeVar("T")


class Image:
    """An image definition. `base_image` is a seed base (`debian-minimal`, `ubuntu-minimal`), an
    image registered in this project, or `scratch`; append `@<digest>` to pin it."""

    __slots__ = ("_name", "_tag", "_base_image", "_ops", "_site")

    def __init__(
        self,
        name: str = "default",
        tag: str = "latest",
        base_image: str = DEFAULT_BASE_IMAGE,
    ) -> None:
        site = call_site()
        for what, value, pattern in (("name", name, NAME_RE), ("tag", tag, TAG_RE)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise _fail(
                    f"invalid image {what} {value!r}: use letters, digits, '.', '_' and '-' "
                    f"(at most 128, starting with a letter or digit)",
                    site,
                )
        if not isinstance(base_image, str) or not base_image.strip():
            raise _fail(f"base_image must be a non-empty string, got {base_image!r}", site)
        if ir.codec.find_surrogate(base_image) is not None:
            raise _fail(f"base_image {base_image!r} holds a lone surrogate, which is not text",
                        site)  # fmt: skip
        self._name = name
        self._tag = tag
        self._base_image = base_image.strip()
        self._ops: tuple[_Op, ...] = ()
        self._site = site

    # -- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def tag(self) -> str:
        return self._tag

    @property
    def base_image(self) -> str:
        return self._base_image

    @property
    def defined_at(self) -> Span | None:
        """Where `Image(...)` was called."""
        return self._site

    @property
    def steps(self) -> tuple[ir.Step, ...]:
        return tuple(op.step for op in self._ops)

    def __repr__(self) -> str:
        return f"Image(name={self._name!r}, tag={self._tag!r}, steps={len(self._ops)})"

    # -- building ---------------------------------------------------------------------------

    def _with(self, step: ir.Step, site: Span | None, force: bool = False) -> Image:
        bad = ir.codec.find_surrogate(ir.step_to_obj(step))
        if bad is not None:
            raise _fail(f"the string {bad[1]!r} holds a lone surrogate (\\ud800-\\udfff), which "
                        "is not text", site)  # fmt: skip
        new = object.__new__(Image)
        new._name, new._tag, new._base_image, new._site = (
            self._name, self._tag, self._base_image, self._site,
        )  # fmt: skip
        new._ops = (*self._ops, _Op(step, ir.StepMeta(span=site, force=force)))
        return new

    def run(self, commands: str | Sequence[str], options: Mapping[str, Any] | None = None) -> Image:
        """Run shell commands. A list runs its commands in order in one step (`a && b`), stopping
        at the first that fails. Options: env (dict), user, workdir, network
        ('default'|'none'|'host'), mounts (list of `type=cache,target=/x` strings or dicts),
        force (rebuild even when cached)."""
        site = call_site()
        cmds = _str_list(commands, "commands", site)
        cmds = [c for c in cmds if c.strip()]
        opts = _options(options, _RUN_OPTIONS, "run", site)
        if not cmds:
            return self
        step = ir.Run(
            command=(" && ".join(cmds),),
            env=_pairs(opts.get("env", {}), "options['env']", site),
            user=_opt_str(opts, "user", site),
            workdir=_opt_str(opts, "workdir", site),
            mounts=tuple(_mount(m, site) for m in _list(opts.get("mounts", []), "mounts", site)),
            network=_choice(
                opts.get("network", "default"), ("default", "none", "host"), "network", site
            ),  # fmt: skip
        )
        return self._with(step, site, _bool(opts.get("force", False), "force", site))

    def copy(
        self, src: str | Sequence[str], dest: str, options: Mapping[str, Any] | None = None
    ) -> Image:
        """Copy files from the build context (the folder of the image file) into the image.
        Options: chown, chmod, from (a registered image), link, parents, exclude (list), force."""
        site = call_site()
        sources = _str_list(src, "src", site)
        opts = _options(options, _COPY_OPTIONS, "copy", site)
        if not sources:
            return self
        step = ir.Copy(
            sources=tuple(sources),
            dest=_nonempty(dest, "dest", site),
            from_=_opt_str(opts, "from", site),
            chown=_opt_str(opts, "chown", site),
            chmod=_chmod(opts.get("chmod"), site),
            link=_bool(opts.get("link", False), "link", site),
            parents=_bool(opts.get("parents", False), "parents", site),
            excludes=tuple(_str_list(opts.get("exclude", []), "exclude", site)),
        )
        return self._with(step, site, _bool(opts.get("force", False), "force", site))

    def add(
        self, src: str | Sequence[str], dest: str, options: Mapping[str, Any] | None = None
    ) -> Image:
        """Like `copy`; URLs are downloaded and local tar archives unpacked.
        Options: chown, chmod, checksum, keep_git_dir, link, exclude (list), force."""
        site = call_site()
        sources = _str_list(src, "src", site)
        opts = _options(options, _ADD_OPTIONS, "add", site)
        if not sources:
            return self
        step = ir.Add(
            sources=tuple(sources),
            dest=_nonempty(dest, "dest", site),
            chown=_opt_str(opts, "chown", site),
            chmod=_chmod(opts.get("chmod"), site),
            checksum=_opt_str(opts, "checksum", site),
            keep_git_dir=_bool(opts.get("keep_git_dir", False), "keep_git_dir", site),
            link=_bool(opts.get("link", False), "link", site),
            excludes=tuple(_str_list(opts.get("exclude", []), "exclude", site)),
        )
        return self._with(step, site, _bool(opts.get("force", False), "force", site))

    def env(self, key: str, value: str) -> Image:
        site = call_site()
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise _fail(f"invalid environment variable name {key!r}: no '=' or whitespace", site)
        return self._with(ir.Env(vars=((key, _scalar(value, "value", site)),)), site)

    def workdir(self, directory: str) -> Image:
        site = call_site()
        return self._with(ir.Workdir(path=_nonempty(directory, "directory", site)), site)

    def user(self, user: str) -> Image:
        site = call_site()
        return self._with(ir.User(user=_nonempty(str(user) if isinstance(user, int) else user,
                                                 "user", site)), site)  # fmt: skip

    def entrypoint(self, command: str | Sequence[str]) -> Image:
        """A list is the exec form (argv); a string runs through the shell."""
        site = call_site()
        argv, shell = _command(command, site)
        return self._with(ir.Entrypoint(command=argv, shell=shell), site)

    def cmd(self, command: str | Sequence[str]) -> Image:
        """A list is the exec form (argv); a string runs through the shell."""
        site = call_site()
        argv, shell = _command(command, site)
        return self._with(ir.Cmd(command=argv, shell=shell), site)

    def label(self, key: str, value: str) -> Image:
        site = call_site()
        return self._with(
            ir.Label(labels=((_nonempty(key, "key", site), _scalar(value, "value", site)),)), site
        )

    def expose(self, *ports: int | str) -> Image:
        """Ports as numbers or `80/udp`; the protocol defaults to tcp."""
        site = call_site()
        if not ports:
            return self
        return self._with(ir.Expose(ports=tuple(_port(p, site) for p in ports)), site)

    def arg(self, name: str, default: str | None = None) -> Image:
        site = call_site()
        if not isinstance(name, str) or not ENV_KEY_RE.fullmatch(name):
            raise _fail(f"invalid build argument name {name!r}", site)
        dflt = None if default is None else _scalar(default, "default", site)
        return self._with(ir.Arg(name=name, default=dflt), site)

    def shell(self, argv: Sequence[str]) -> Image:
        site = call_site()
        args = _str_list(argv, "argv", site)
        if isinstance(argv, str) or not args:
            raise _fail("shell() takes the shell's argv as a non-empty list, "
                        "e.g. ['/bin/bash', '-c']", site)  # fmt: skip
        return self._with(ir.Shell(argv=tuple(args)), site)

    def stopsignal(self, signal: str | int) -> Image:
        site = call_site()
        return self._with(ir.StopSignal(signal=_nonempty(str(signal), "signal", site)), site)

    def volume(self, *paths: str) -> Image:
        site = call_site()
        if not paths:
            return self
        return self._with(ir.Volume(paths=tuple(_nonempty(p, "path", site) for p in paths)), site)

    def healthcheck(
        self,
        command: str | Sequence[str] | None,
        *,
        interval: float | None = None,
        timeout: float | None = None,
        start_period: float | None = None,
        start_interval: float | None = None,
        retries: int | None = None,
    ) -> Image:
        """`None` disables a base image's healthcheck; durations are in seconds."""
        site = call_site()
        if command is None:
            test: tuple[str, ...] = ("NONE",)
        else:
            argv, shell = _command(command, site)
            test = ("CMD-SHELL", *argv) if shell else ("CMD", *argv)

        def ns(v: float | None, what: str) -> int | None:
            if v is None:
                return None
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                    or v < 0 or v > 1e9):  # fmt: skip
                raise _fail(f"{what} must be a number of seconds >= 0, got {v!r}", site)
            return int(round(v * 1_000_000_000))

        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):  # fmt: skip
            raise _fail(f"retries must be an integer >= 0, got {retries!r}", site)
        step = ir.Healthcheck(
            test=test,
            interval=ns(interval, "interval"),
            timeout=ns(timeout, "timeout"),
            start_period=ns(start_period, "start_period"),
            start_interval=ns(start_interval, "start_interval"),
            retries=retries,
        )
        return self._with(step, site)

    # -- helpers that lower to plain RUN steps ----------------------------------------------

    def pip_install(
        self,
        *packages: str | Sequence[str],
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        force: bool = False,
    ) -> Image:
        """`python3 -m pip install ...` with the system Python (PEP 668 is lifted in build
        steps by PIP_BREAK_SYSTEM_PACKAGES=1, as for `run("pip install ...")`)."""
        site = call_site()
        pkgs = _flatten(packages, "packages", site)
        if not pkgs:
            return self
        argv = ["python3", "-m", "pip", "install", "--no-cache-dir"]
        if pre:
            argv.append("--pre")
        if index_url is not None:
            argv += ["--index-url", _nonempty(index_url, "index_url", site)]
        if extra_index_url is not None:
            argv += ["--extra-index-url", _nonempty(extra_index_url, "extra_index_url", site)]
        argv += pkgs
        return self._with(ir.Run(command=(shlex.join(argv),)), site, force)

    def apt_install(self, *packages: str | Sequence[str], force: bool = False) -> Image:
        """Install Debian/Ubuntu packages without recommends, cleaning the package lists."""
        site = call_site()
        pkgs = _flatten(packages, "packages", site)
        if not pkgs:
            return self
        cmd = (
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
            f"--no-install-recommends {shlex.join(pkgs)} && rm -rf /var/lib/apt/lists/*"
        )
        return self._with(ir.Run(command=(cmd,)), site, force)

    # -- lowering ---------------------------------------------------------------------------

    def to_ir(self) -> ir.ImageDef:
        base, _, pin = self._base_image.partition("@")
        start = ir.StepMeta(span=self._site)
        steps = (ir.From(image=base, pin=pin or None), *(op.step for op in self._ops))
        metas = (start, *(op.meta for op in self._ops))
        return ir.ImageDef(name=self._name, tag=self._tag, stages=(ir.Stage("main", steps, metas),))


_PUBLIC_METHODS = frozenset(
    name for name in vars(Image) if not name.startswith("_") or name == "__init__"
)

# -- function attachment (Tensorlake's `@function(image=...)`) ------------------------------

_ATTACHED: list[tuple[Callable[..., Any], Image]] = []


def function(*args: Any, image: Image | None = None, **_options: Any) -> Any:
    """Marks a function as running in `image`; other options (cpu, memory, secrets, ...) are
    accepted and ignored here. Usable as `@function` and `@function(image=...)`."""

    def wrap(fn: T) -> T:
        if image is not None:
            _ATTACHED.append((fn, image))  # type: ignore[arg-type]
            try:
                fn.__tlimage_image__ = image  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
        return fn

    if args and callable(args[0]) and len(args) == 1:
        return wrap(args[0])
    return wrap


# -- validation helpers ---------------------------------------------------------------------

_RUN_OPTIONS = ("env", "force", "mounts", "network", "user", "workdir")
_COPY_OPTIONS = ("chmod", "chown", "exclude", "force", "from", "link", "parents")
_ADD_OPTIONS = ("checksum", "chmod", "chown", "exclude", "force", "keep_git_dir", "link")


def _options(
    options: Mapping[str, Any] | None, allowed: tuple[str, ...], method: str, site: Span | None
) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise _fail(f"options must be a dict, got {type(options).__name__}", site)
    for key in options:
        if key not in allowed:
            raise _fail(f"unknown option {key!r}; allowed: {', '.join(allowed)}", site)
    return dict(options)


def _str_list(value: Any, what: str, site: Span | None) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping | bytes):
        out = list(value)
        for i, v in enumerate(out):
            if not isinstance(v, str):
                raise _fail(f"{what}[{i}] must be a string, got {type(v).__name__} {v!r}", site)
        return out
    raise _fail(f"{what} must be a string or a list of strings, got {type(value).__name__}", site)


def _flatten(values: tuple[Any, ...], what: str, site: Span | None) -> list[str]:
    out: list[str] = []
    for v in values:
        out += _str_list(v, what, site)
    return [v for v in out if v.strip()]


def _list(value: Any, what: str, site: Span | None) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    raise _fail(f"options[{what!r}] must be a list, got {type(value).__name__}", site)


def _nonempty(value: Any, what: str, site: Span | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"{what} must be a non-empty string, got {value!r}", site)
    return value


def _opt_str(opts: Mapping[str, Any], key: str, site: Span | None) -> str | None:
    if key not in opts or opts[key] is None:
        return None
    return _nonempty(opts[key], f"options[{key!r}]", site)


def _scalar(value: Any, what: str, site: Span | None) -> str:
    """Strings as given; numbers are accepted and spelled as Python prints them."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _fail(f"{what} must be a string, got {type(value).__name__} {value!r}", site)


def _bool(value: Any, what: str, site: Span | None) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"options[{what!r}] must be True or False, got {value!r}", site)
    return value


def _choice(value: Any, allowed: tuple[str, ...], what: str, site: Span | None) -> Any:
    if value not in allowed:
        raise _fail(f"options[{what!r}] is {value!r}; allowed: {', '.join(allowed)}", site)
    return value


def _pairs(value: Any, what: str, site: Span | None) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise _fail(f"{what} must be a dict of strings, got {type(value).__name__}", site)
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not ENV_KEY_RE.fullmatch(k):
            raise _fail(f"invalid environment variable name {k!r} in {what}", site)
        out.append((k, _scalar(v, f"{what}[{k!r}]", site)))
    return tuple(out)


def _chmod(value: Any, site: Span | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return format(value, "o")
    if isinstance(value, str) and re.fullmatch(
        r"[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*(,[ugoa]*[-+=][rwxXst]*)*", value
    ):  # noqa: E501
        return value
    raise _fail(f"invalid chmod {value!r}: use an octal mode like '755' or a symbolic one "
                "like 'u+x'", site)  # fmt: skip


def _port(value: Any, site: Span | None) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    m = PORT_RE.fullmatch(text) if isinstance(text, str) else None
    if not m or not 0 < int(m.group(1)) <= 65535 or (m.group(2) and not
                                                       0 < int(m.group(2)) <= 65535):  # fmt: skip
        raise _fail(f"invalid port {value!r}: use a number 1-65535, a range '8000-8010', "
                    "optionally with /tcp, /udp or /sctp", site)  # fmt: skip
    rng = m.group(1) + (f"-{m.group(2)}" if m.group(2) else "")
    return f"{rng}/{(m.group(3) or 'tcp').lower()}"


def _command(command: Any, site: Span | None) -> tuple[tuple[str, ...], bool]:
    if isinstance(command, str):
        if not command.strip():
            raise _fail("the command must not be empty", site)
        return (command,), True
    return tuple(_str_list(command, "command", site)), False


def _mount(value: Any, site: Span | None) -> ir.Mount:
    """`type=cache,target=/root/.cache` or {'type': 'cache', 'target': ...}, read by the parser
    every front end shares (`frontends.mounts`), so equal mounts give equal digests whichever
    front end wrote them."""
    from tlimage.frontends.mounts import mount_from_user
    from tlimage.frontends.problem import Problem

    try:
        return mount_from_user(value)
    except Problem as e:
        raise _fail(e.message, site, hint=e.hint) from None
