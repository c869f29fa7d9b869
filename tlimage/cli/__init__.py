"""The `tl` command. Commands parse arguments, call the API and render; nothing else.

Start-up stays fast: this module imports nothing heavy; each command imports what it needs
when it runs.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from tlimage.errors import TlimageError

    try:
        import click

        from tlimage.cli.app import command

        try:
            rv = command().main(args=argv, prog_name="tl", standalone_mode=False)
        except click.exceptions.Abort:
            print("aborted", file=sys.stderr)
            return 130
        except click.ClickException as e:
            e.show()
            return e.exit_code
        return rv if isinstance(rv, int) else 0
    except TlimageError as e:
        from tlimage.cli.render import print_error

        print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
