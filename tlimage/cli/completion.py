"""`tl --show-completion [SHELL]` and `tl --install-completion [SHELL]`.

Typer's own flags take no value and find the shell from the parent process only: run from a
script, a cron job or a background job with no shell above it, `tl --show-completion bash`
failed with "Shell  not supported", and under zsh it printed zsh's script whatever was asked.
Here the shell named on the command line wins; without one, the parent shell, then `$SHELL`;
when neither names a shell we have a script for, a usage error says how to name it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

PROG = "tl"
COMPLETE_VAR = "_TL_COMPLETE"
SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def detect_shell(environ: dict[str, str] | None = None) -> str | None:
    """The shell to write a script for when none is named: the parent shell, else `$SHELL`."""
    env = os.environ if environ is None else environ
    try:
        import shellingham

        name, _ = shellingham.detect_shell()
        if name in SHELLS:
            return str(name)
    except (ImportError, OSError):  # shellingham.ShellDetectionFailure is an OSError
        pass
    name = os.path.basename(env.get("SHELL", "")).removesuffix(".exe").lower()
    return name if name in SHELLS else None


def _shell(value: str, param: click.Parameter) -> str:
    if value:
        if value not in SHELLS:
            raise click.BadParameter(f"{value!r}: one of {', '.join(SHELLS)}", param=param)
        return value
    found = detect_shell()
    if found is None:
        raise click.BadParameter(
            "no parent shell and no $SHELL to tell which shell this is: name it, e.g. "
            f"`{PROG} {param.opts[0]} bash`",  # fmt: skip
            param=param,
        )
    return found


def _show(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    from typer.completion import get_completion_script

    shell = _shell(value, param)
    click.echo(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell))
    sys.exit(0)


def _install(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None or ctx.resilient_parsing:
        return value
    from typer.completion import install

    shell, path = install(shell=_shell(value, param), prog_name=PROG, complete_var=COMPLETE_VAR)
    click.echo(f"{shell} completion installed in {path}")
    click.echo("Completion will take effect once you restart the terminal")
    sys.exit(0)


def options() -> list[click.Option]:
    """The two options, each with an optional SHELL value (`--show-completion` alone detects)."""
    from typer.completion import completion_init

    completion_init()  # Typer's completion classes answer `_TL_COMPLETE=complete_<shell>`
    common: dict[str, Any] = {"is_flag": False, "flag_value": "", "default": None,
                              "expose_value": False, "is_eager": True, "metavar": "[SHELL]"}  # fmt: skip
    return [
        click.Option(
            ["--install-completion"],
            callback=_install,
            **common,
            help="Install completion for SHELL (default: the current shell).",
        ),  # fmt: skip
        click.Option(
            ["--show-completion"],
            callback=_show,
            **common,
            help="Print the completion script for SHELL (default: the current shell), "
            "to copy it or customize the installation.",
        ),  # fmt: skip
    ]
