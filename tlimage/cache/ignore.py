""".dockerignore rules, with the semantics of moby/patternmatcher (what `docker build` and BuildKit
use), so one ignore file means the same thing here as there.

Reading a file (`ignorefile.ReadAll`): a UTF-8 BOM is dropped; a line whose first character is `#`
is a comment (an indented `#` is not); lines are trimmed; empty lines are skipped; `!` starts an
exception; each pattern is cleaned like Go's `filepath.Clean` and a leading `/` is removed.

Matching (`MatchesOrParentMatches`): patterns apply in order, the last one that matches wins, and a
pattern matches a path when it matches the path or any of its parent directories (so `dir`
excludes everything below `dir`, and `!dir/keep` re-includes one file). `*` and `?` never match
`/`; `**` matches any number of directories (also none); `[...]` and `\\` are as in Go's
`filepath.Match`. Patterns are anchored at the context root: unlike .gitignore, `foo` does not
match `a/foo` (write `**/foo`).

Why not the `pathspec` package: it implements .gitignore semantics (unanchored names, trailing-`/`
directory-only patterns, `!` unable to re-include below an excluded directory), which differ
from .dockerignore on exactly the cases above; reproducing moby's rules is a small,
well-specified translation, pinned by the test table taken from its behaviour.
"""

from __future__ import annotations

import posixpath
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tlimage.errors import SourceError, TlimageError
from tlimage.source import Span

# Characters Go's regexp gives meaning but filepath.Match does not; escaped on translation.
_ESCAPE = set(".+()|{}$")

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}


class IgnorePatternError(SourceError):
    """A malformed pattern in an ignore file, reported at its file:line:col."""


class BadPattern(TlimageError):
    """A malformed pattern given directly (not from a file)."""

    exit_code = 2


def go_clean(path: str) -> str:
    """Go's `path.Clean`: `posixpath.normpath`, except that a leading `//` becomes `/`."""
    if path == "":
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


@dataclass(frozen=True, slots=True)
class PatternLine:
    """A pattern as read from an ignore file: `!`-prefixed for exceptions, with where it was."""

    text: str
    line: int = 0
    col: int = 1


def read_ignore_text(text: str) -> list[PatternLine]:
    """Patterns from the text of an ignore file (moby's `ignorefile.ReadAll`)."""
    out: list[PatternLine] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if lineno == 1:
            raw = raw.removeprefix("\ufeff")
        if raw.startswith("#"):
            continue
        pattern = raw.strip()
        if not pattern:
            continue
        col = len(raw) - len(raw.lstrip()) + 1
        out.append(PatternLine(normalize_line(pattern), lineno, col))
    return out


def normalize_line(pattern: str) -> str:
    """One ignore line as ReadAll leaves it: trimmed, cleaned, without a leading `/`, `!` kept."""
    pattern = pattern.strip()
    invert = pattern.startswith("!")
    if invert:
        pattern = pattern[1:].strip()
    if pattern:
        pattern = go_clean(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
    return ("!" if invert else "") + pattern


class _Pattern:
    __slots__ = ("text", "exclusion", "kind", "regex", "origin")

    def __init__(self, text: str, exclusion: bool, origin: PatternLine | None) -> None:
        self.text = text
        self.exclusion = exclusion
        self.origin = origin
        self.kind, self.regex = _compile(text)

    def match(self, path: str) -> bool:
        kind = self.kind
        if kind == "exact":
            return path == self.text
        if kind == "prefix":
            return path.startswith(self.text[:-2])
        if kind == "suffix":
            suffix = self.text[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


class IgnoreMatcher:
    """An ordered list of .dockerignore patterns. Paths are relative, `/`-separated.

    Patterns given as strings are read like lines of an ignore file (trimmed, cleaned, leading
    `/` removed), so a DSL's ignore list means what the same lines would in .dockerignore.
    """

    def __init__(
        self,
        patterns: Iterable[str | PatternLine] = (),
        *,
        source: str | None = None,
        text: str | None = None,
    ) -> None:
        self.source = source
        self._patterns: list[_Pattern] = []
        for item in patterns:
            origin = item if isinstance(item, PatternLine) else None
            p = item.text if origin else normalize_line(item)  # type: ignore[union-attr]
            p = p.strip()
            if not p:
                continue
            p = go_clean(p)
            exclusion = p.startswith("!")
            if exclusion:
                if len(p) == 1:
                    self._fail('illegal exclusion pattern: "!"', origin, text)
                p = p[1:]
            problem = _validate(p)
            if problem:
                self._fail(f"bad pattern {p!r}: {problem}", origin, text)
            try:
                self._patterns.append(_Pattern(p, exclusion, origin))
            except re.error as e:
                self._fail(f"bad pattern {p!r}: {e}", origin, text)
        self.has_exclusions = any(p.exclusion for p in self._patterns)

    def _fail(self, message: str, origin: PatternLine | None, text: str | None) -> None:
        if origin is not None and self.source is not None:
            span = Span(self.source, origin.line, origin.col)
            raise IgnorePatternError(message, span, text=text)
        raise BadPattern(f"{self.source}: {message}" if self.source else message)

    @classmethod
    def from_text(cls, text: str, source: str = ".dockerignore") -> IgnoreMatcher:
        return cls(read_ignore_text(text), source=source, text=text)

    @classmethod
    def from_file(cls, path: str | Path) -> IgnoreMatcher:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
        return cls.from_text(text, source=str(path))

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    @property
    def patterns(self) -> list[str]:
        return [("!" if p.exclusion else "") + p.text for p in self._patterns]

    def matches(self, path: str) -> bool:
        """True when `path` is excluded (moby's `MatchesOrParentMatches`)."""
        path = go_clean(path)
        if path == ".":
            return False  # the context root itself is never excluded
        return self.evaluate(path, None)[0]

    def evaluate(self, path: str, parent: Sequence[bool] | None) -> tuple[bool, list[bool]]:
        """Excluded?, plus per-pattern "matches this path or an ancestor" for its children.

        `parent` is what this returned for the parent directory (None at the top, or when not
        known: ancestors are then matched one by one). This is the walk-friendly form of
        `matches`; both give the same answer.
        """
        pats = self._patterns
        hits = [False] * len(pats)
        ancestors: list[str] | None = None
        for i, pat in enumerate(pats):
            hit = parent[i] if parent is not None else False
            if not hit:
                hit = pat.match(path)
            if not hit and parent is None:
                if ancestors is None:
                    ancestors = _ancestors(path)
                hit = any(pat.match(a) for a in ancestors)
            hits[i] = hit
        excluded = False
        for pat, hit in zip(pats, hits, strict=True):
            if pat.exclusion != excluded:
                continue
            if hit:
                excluded = not pat.exclusion
        return excluded, hits


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]


def find_ignore_file(context_dir: str | Path, dockerfile: str | Path | None = None) -> Path | None:
    """`<Dockerfile>.dockerignore` beside the Dockerfile when it exists (BuildKit's rule), else
    `<context>/.dockerignore`, else None."""
    if dockerfile is not None:
        specific = Path(f"{dockerfile}.dockerignore")
        if specific.is_file():
            return specific
    default = Path(context_dir) / ".dockerignore"
    return default if default.is_file() else None


def load_ignore(context_dir: str | Path, dockerfile: str | Path | None = None) -> IgnoreMatcher:
    path = find_ignore_file(context_dir, dockerfile)
    return IgnoreMatcher.from_file(path) if path else IgnoreMatcher()


# ----------------------------------------------------------------------------------------------
# Pattern translation (moby's Pattern.compile) and validation (Go's filepath.Match syntax)


def glob_matcher(segment: str) -> re.Pattern[str] | str:
    """One path component as Go's `filepath.Match` reads it (COPY/ADD source wildcards): `*`
    and `?` within the component, `[...]` classes, `\\` escapes; `**` is just two `*`.
    Returns the literal text when there is no wildcard, else a regex for `fullmatch`.
    Raises BadPattern for malformed syntax."""
    problem = _validate(segment)
    if problem:
        raise BadPattern(f"bad wildcard {segment!r}: {problem}")
    try:
        kind, regex = _compile(segment, doublestar=False)
    except re.error as e:
        raise BadPattern(f"bad wildcard {segment!r}: {e}") from None
    return segment if regex is None else regex


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[\\")


def _compile(pattern: str, doublestar: bool = True) -> tuple[str, re.Pattern[str] | None]:
    """Translate like moby's `Pattern.compile`: the same match kinds, and the regex Go would
    build from the pattern, written for Python's `re` (used with `fullmatch`)."""
    out: list[str] = []
    kind = "exact"
    i, n = 0, len(pattern)
    first = True
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if doublestar and i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1  # "**/" is treated as "**"
                if i >= n:
                    # "**" at the end accepts everything, as in .gitignore
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        out.append(".*")
                        kind = "regex"
                else:
                    out.append("(?:.*/)?")  # any number of directories, also none
                    kind = "regex"
                if first:
                    kind = "suffix"
            else:
                out.append("[^/]*")
                kind = "regex"
        elif ch == "?":
            out.append("[^/]")
            kind = "regex"
        elif ch in _ESCAPE:
            out.append("\\" + ch)
        elif ch == "\\":
            if i < n:
                # Go's regexp then reads the escape: "\\d" is a digit class there, too.
                nxt = pattern[i]
                out.append("\\" + nxt if nxt.isalnum() else re.escape(nxt))
                i += 1
                kind = "regex"
            else:
                out.append("\\\\")
        elif ch == "[":
            cls, i = _class(pattern, i)
            out.append(cls)
            kind = "regex"
        elif ch == "]":
            out.append("\\]")
            kind = "regex"
        else:
            # Everything else goes through unescaped, as in moby; "^" stays an anchor there, and
            # here (a quirk: "a^b*" never matches).
            out.append(ch)
        first = False
    if kind != "regex":
        return kind, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kind, re.compile("".join(out))


def _class(pattern: str, i: int) -> tuple[str, int]:
    """The class whose body starts at `i` (just after `[`), parsed as Go's regexp parses it, as
    a Python class; and the index after its closing `]`."""
    out = ["["]
    n = len(pattern)
    if i < n and pattern[i] == "^":
        out.append("^")
        i += 1
    start = i
    while True:
        if i >= n:
            raise re.error("missing ]")
        ch = pattern[i]
        if ch == "]" and i > start:
            return "".join(out) + "]", i + 1
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            out.append("\\" + nxt if nxt.isalnum() else re.escape(nxt))
            i += 2
            continue
        if pattern.startswith("[:", i):
            close = pattern.find(":]", i + 2)
            if close != -1:
                name = pattern[i + 2 : close]
                if name not in _POSIX_CLASSES:
                    raise re.error(f"invalid character class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                i = close + 2
                continue
        out.append("\\" + ch if ch in "[]\\&~|" else ch)
        i += 1


def _validate(pattern: str) -> str | None:
    """Go's `filepath.Match` syntax check: None when fine, else what is wrong."""
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= n:
                return "trailing backslash"
            i += 2
            continue
        if ch == "[":
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            nrange = 0
            while True:
                if i < n and pattern[i] == "]" and nrange > 0:
                    i += 1
                    break
                lo, i, err = _class_char(pattern, i)
                if err:
                    return err
                if i < n and pattern[i] == "-":
                    _, i, err = _class_char(pattern, i + 1)
                    if err:
                        return err
                nrange += 1
            continue
        i += 1
    return None


def _class_char(pattern: str, i: int) -> tuple[str, int, str | None]:
    n = len(pattern)
    if i >= n:
        return "", i, "unterminated character class"
    ch = pattern[i]
    if ch in "-]":
        return "", i, f"unexpected {ch!r} in character class"
    if ch == "\\":
        if i + 1 >= n:
            return "", i, "trailing backslash"
        return pattern[i + 1], i + 2, None
    return ch, i + 1, None
