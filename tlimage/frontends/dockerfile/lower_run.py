"""Lowering of RUN (BuildKit's `dispatchRun` and `convert_runmount.go`): heredocs, mounts,
network and security modes. The command itself is not expanded: the shell does that when it
runs."""

from __future__ import annotations

import re
from collections.abc import Callable

from tlimage import ir
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile.lower_base import Problem
from tlimage.frontends.dockerfile.parser import parse_heredoc
from tlimage.frontends.mounts import lower_mount

# A lone heredoc that starts with `#!` is a script for the interpreter it names. BuildKit
# writes it to a file on a read-only mount and executes that; the IR has no inline files for
# RUN, so the step carries the script as an argument and this runner writes it to a temporary
# folder, executes it and removes it. `$0` is the heredoc's name, `$1` the script.
SCRIPT_RUNNER = (
    'd=$(mktemp -d) && printf "%s" "$1" > "$d/$0" && chmod 755 "$d/$0" && "$d/$0"; '
    's=$?; rm -rf "$d"; exit $s'
)

_CHOMP = re.compile(r"(?m)^\t+")


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
