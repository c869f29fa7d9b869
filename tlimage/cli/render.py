"""Rendering for people (rich on a terminal, plain lines otherwise) and for machines (NDJSON)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tlimage.errors import TlimageError


def is_tty(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("CI") != "true"


def print_error(e: TlimageError) -> None:
    text = e.render()
    if is_tty(sys.stderr):
        from rich.console import Console
        from rich.markup import escape

        first, _, rest = text.partition("\n")
        con = Console(stderr=True, highlight=False)
        con.print(f"[bold red]error:[/] {escape(first)}")
        if rest:
            con.print(escape(rest))
    else:
        print(f"error: {text}", file=sys.stderr)


def emit_json(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()
