"""`tl secrets set|ls|rm`: named values for sandboxes (`tl sbx new --secret NAME`).

A value is never printed back. `set NAME` (or `NAME=-`) reads it from stdin, which keeps it
out of the shell history and of `ps`; `set NAME=VALUE` is accepted for scripts.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tlimage.cli.options import ProjectOpt

secrets_app = typer.Typer(help="Secrets passed to sandboxes as environment variables.",
                          no_args_is_help=True, rich_markup_mode=None)  # fmt: skip


def _read_value(name: str) -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"value for {name}: ")
    data = sys.stdin.buffer.read()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        from tlimage.errors import RuntimeError_

        raise RuntimeError_(f"secret {name}: the value on stdin is not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") and text.count("\n") == 1 else text


@secrets_app.command("set")
def set_(
    item: Annotated[
        str, typer.Argument(help="NAME (value read from stdin), NAME=- (the same) or NAME=VALUE.")
    ],
    project: ProjectOpt = None,
) -> None:
    """Store a secret in the project (file mode 0600 in the state folder)."""
    from tlimage.runtime import set_secret

    name, eq, value = item.partition("=")
    if not eq or value == "-":
        value = _read_value(name)
    replaced = set_secret(name, value, project=project)
    print(f"{'updated' if replaced else 'stored'} secret {name}", file=sys.stderr)


@secrets_app.command("ls")
def ls(
    project: ProjectOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="A JSON list of names.")] = False,
) -> None:
    """List the project's secret names (never their values)."""
    from tlimage.runtime import list_secrets

    names = list_secrets(project=project)
    if json_:
        import json

        print(json.dumps(names))
        return
    for n in names:
        print(n)
    if not names:
        print("no secrets (store one with: tl secrets set NAME)", file=sys.stderr)


@secrets_app.command("rm")
def rm(names: Annotated[list[str], typer.Argument(help="Secret names.")],
       project: ProjectOpt = None) -> None:  # fmt: skip
    """Delete secrets from the project."""
    from tlimage.runtime import remove_secret

    for n in names:
        remove_secret(n, project=project)
        print(n)
