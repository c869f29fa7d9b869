"""Source locations and caret rendering.

A `Span` names a place in a user's file. Spans travel beside IR steps (never inside a digest) so that
an error found late — a failing RUN, a missing COPY source — points back at the line that asked for it.
Lines and columns are 1-based; `end_*` are inclusive of the last line, exclusive of the last column.
"""

from __future__ import annotations

import linecache
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    file: str
    line: int
    col: int = 1
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @property
    def short(self) -> str:
        """`file:line`, the form used for DSL call sites."""
        return f"{self.file}:{self.line}"

    def render(self, message: str, text: str | None = None) -> str:
        """`file:line:col: message`, then the offending line and a caret under the column.

        `text` is the whole source; when omitted the file is read (via linecache) if it exists.
        """
        head = f"{self}: {message}"
        line = _source_line(self.file, self.line, text)
        if line is None:
            return head
        line = line.rstrip("\r\n").expandtabs(1)
        width = 1
        if self.end_col is not None and (self.end_line in (None, self.line)):
            width = max(1, self.end_col - self.col)
        gutter = f"{self.line:>4} | "
        caret = " " * (len(gutter) + max(0, self.col - 1)) + "^" * min(width, max(1, len(line)))
        return f"{head}\n{gutter}{line}\n{caret}"


def _source_line(file: str, line: int, text: str | None) -> str | None:
    if text is not None:
        lines = text.split("\n")  # not splitlines(): \f, \v, \x1c-\x1e, \u2028 are not breaks
        return lines[line - 1] if 0 < line <= len(lines) else None
    got = linecache.getline(file, line)
    return got.rstrip("\n") or None


def render_at(file: str, text: str, line: int, col: int, message: str, width: int = 1) -> str:
    """Render `message` at a place in `text` (convenience for parsers that hold the text)."""
    return Span(file, line, col, line, col + width).render(message, text)
