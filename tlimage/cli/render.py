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


def table(headers: list[str], rows: list[list[str]], empty: str = "nothing to show") -> None:
    """Aligned columns; rich on a terminal, plain text otherwise."""
    if not rows:
        print(empty, file=sys.stderr)
        return
    if is_tty():
        from rich.console import Console
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        Console().print(t)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    for r in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def size(n: float) -> str:
    """Bytes in decimal units, as people read them (`12.3 MB`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC (`2026-12-05T00:12:00Z`), the one time format of --json."""
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
