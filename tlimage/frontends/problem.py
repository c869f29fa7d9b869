"""`Problem`: an error about the input found where its place is not known yet.

Code that checks a value (a flag, a `--mount` spec, an instruction's arguments) raises
`Problem(message, needle, hint)`; the front end that called it knows the place and turns it into
its own located error: a `DockerfileError` pointing at `needle` in the instruction's lines, a
`DSLError` at the user's call site, a `JSONFormError` at the JSON path. It never reaches a user
as itself.
"""

from __future__ import annotations


class Problem(Exception):
    """`needle` is the text to point at (or several, tried in order); None points at the
    instruction's keyword or the whole value."""

    def __init__(
        self, message: str, needle: str | tuple[str, ...] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.needle = needle
        self.hint = hint
