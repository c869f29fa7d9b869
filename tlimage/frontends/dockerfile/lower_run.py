"""Lowering of RUN (BuildKit's `dispatchRun` and `convert_runmount.go`): heredocs, mounts,
network and security modes. The command itself is not expanded: the shell does that when it
runs."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable

from tlimage import ir
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile.lower_base import Problem
from tlimage.frontends.dockerfile.parser import parse_heredoc

# A lone heredoc that starts with `#!` is a script for the interpreter it names. BuildKit
# writes it to a file on a read-only mount and executes that; the IR has no inline files for
# RUN, so the step carries the script as an argument and this runner writes it to a temporary
# folder, executes it and removes it. `$0` is the heredoc's name, `$1` the script.
SCRIPT_RUNNER = (
    'd=$(mktemp -d) && printf "%s" "$1" > "$d/$0" && chmod 755 "$d/$0" && "$d/$0"; '
    's=$?; rm -rf "$d"; exit $s'
)

_CHOMP = re.compile(r"(?m)^\t+")

# Each mount type's default for `readonly`: only values that differ are recorded.
_READONLY_DEFAULT = {"bind": True, "secret": True, "ssh": True, "cache": False, "tmpfs": False}


def run_command(cmd: ins.RunCommand) -> tuple[tuple[str, ...], bool]:
    """The IR command and whether it runs through the stage's shell.

    Heredocs as BuildKit runs them: a command that is only `<<EOF` runs the body (chomped for
    `<<-`) as the shell command, or as a script when it starts with `#!`; any other command is
    given to the shell with each body and terminator appended, for the shell to read.
    """
    args = cmd.cmd
    if not cmd.files:
        if not args:
            raise Problem("RUN requires a command to run")
        return args, cmd.prepend_shell
    if len(args) != 1 or not cmd.prepend_shell:
        raise Problem(f"parsing produced an invalid run command: {list(args)}")
    if parse_heredoc(args[0]) is not None:
        first = cmd.files[0]
        data = _CHOMP.sub("", first.data) if first.chomp else first.data
        if data.startswith("#!"):
            return ("/bin/sh", "-c", SCRIPT_RUNNER, first.name, data), False
        return (data,), True
    text = args[0] + "".join("\n" + f.data + f.name for f in cmd.files)
    return (text,), True


def lower_mount(m: ins.Mount, workdir: str, resolve_from: Callable[[str], str]) -> ir.Mount:
    """One parsed (and expanded) `--mount` as an IR mount: type, target, and the options that
    differ from the type's defaults, under their long names, sorted. A relative target
    resolves against the working directory, as BuildKit does; `resolve_from` maps `from=` to
    a stage's IR name (or leaves an image name)."""
    target = m.target
    if m.type not in ("secret", "ssh"):
        if not target.startswith("/"):
            target = posixpath.join("/", workdir, target)
        target = "/" + posixpath.normpath(target).lstrip("/")
        if target == "/":
            raise Problem(f'invalid mount target "{target}"', "--mount")
    opts: dict[str, str] = {}
    if m.from_:
        opts["from"] = resolve_from(m.from_)
    if m.source:
        opts["source"] = m.source
    if m.id:
        opts["id"] = m.id
    if m.sharing:
        opts["sharing"] = m.sharing
    if m.readonly != _READONLY_DEFAULT[m.type]:
        opts["readonly"] = "true" if m.readonly else "false"
    if m.required:
        opts["required"] = "true"
    if m.mode is not None:
        opts["mode"] = format(m.mode, "04o")
    if m.uid is not None:
        opts["uid"] = str(m.uid)
    if m.gid is not None:
        opts["gid"] = str(m.gid)
    if m.size is not None:
        opts["size"] = str(m.size)
    if m.env:
        opts["env"] = m.env
    return ir.Mount(type=m.type, target=target, options=tuple(sorted(opts.items())))  # type: ignore[arg-type]


def lower_run(cmd: ins.RunCommand, workdir: str, resolve_from: Callable[[str], str]) -> ir.Run:
    """`cmd` is expanded already (its mounts parsed with the stage's variables)."""
    command, shell = run_command(cmd)
    mounts = tuple(lower_mount(m, workdir, resolve_from) for m in cmd.mounts)
    return ir.Run(
        command=command,
        shell=shell,
        mounts=mounts,
        network=cmd.network,  # type: ignore[arg-type]
        security=cmd.security,  # type: ignore[arg-type]
    )
