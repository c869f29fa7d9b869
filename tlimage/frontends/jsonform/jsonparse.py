"""Pass 1 of the JSON front end: a JSON parser that keeps the offset of every value and key, so
errors and step spans point into the file; the document error and the spelling of JSON paths
and values that all three passes use."""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tlimage.errors import JSONFormError
from tlimage.source import Span

Path_ = tuple[str | int, ...]  # a JSON path as keys and indices; `format_path` spells it


# -- errors -----------------------------------------------------------------------------------


class JSONDocumentError(JSONFormError):
    """A JSON image document error at a place: `file:line:col: path: message`, then the line
    and a caret. `span` is in the JSON file, or in the SDK source that defined the operation
    (JSON exported by the TypeScript SDK); `text` is the JSON text when the span is in it."""

    def __init__(
        self,
        message: str,
        path: str = "",
        *,
        file: str | None = None,
        span: Span | None = None,
        text: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, path, file=file, hint=hint)
        self.span = span
        self.text = text

    def __str__(self) -> str:
        if self.span is None:
            return super().__str__()
        msg = f"{self.path}: {self.message}" if self.path else self.message
        return self.span.render(msg, self.text)


def format_path(path: Path_) -> str:
    """`images[0].operations[3].args`; keys that are not identifiers are quoted (`env["A B"]`)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


_IDENT = re.compile(r"[A-Za-z_$][\w$]*")


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON, shortened to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {type(None): "null", str: "a string", list: "a list", dict: "an object"}[type(value)]


def described(value: Any) -> str:
    """`a number 5`, `a string "x"`, `a list`: containers are named, not printed."""
    if isinstance(value, list | dict) or value is None:
        return kind(value)
    return f"{kind(value)} {show(value)}"


# -- pass 1: parsing with positions -----------------------------------------------------------


@dataclass
class Document:
    """A parsed JSON document: its value and where each value and key starts in `text`."""

    file: str
    text: str
    value: Any
    positions: dict[Path_, int] = field(default_factory=dict)
    key_positions: dict[Path_, int] = field(default_factory=dict)
    _line_starts: list[int] | None = field(default=None, repr=False)

    def span_at(self, offset: int) -> Span:
        if self._line_starts is None:
            self._line_starts = [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", self.text)]
        i = bisect.bisect_right(self._line_starts, offset) - 1
        return Span(self.file, i + 1, offset - self._line_starts[i] + 1)

    def span(self, path: Path_, *, key: bool = False) -> Span | None:
        """The place of the value at `path` (of its key, with `key=True`), or of the nearest
        enclosing value that has one."""
        table = self.key_positions if key else self.positions
        if key and path in table:
            return self.span_at(table[path])
        for n in range(len(path), -1, -1):
            if path[:n] in self.positions:
                return self.span_at(self.positions[path[:n]])
        return None


_WS = frozenset(" \t\n\r")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_$][\w$.-]*")
_MAX_DEPTH = 256


class _SyntaxFail(Exception):
    def __init__(self, message: str, offset: int) -> None:
        self.message = message
        self.offset = offset


def parse(text: str, file: str) -> Document:
    """Parse `text` as one JSON value; raises JSONDocumentError at file:line:col."""
    doc = Document(file=file, text=text, value=None)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the document
        text = " " + text[1:]
    try:
        p = _Parser(text, doc)
        doc.value = p.document()
    except _SyntaxFail as e:
        span = doc.span_at(min(e.offset, len(text)))
        raise JSONDocumentError(
            f"invalid JSON: {e.message}", file=file, span=span, text=doc.text
        ) from None
    return doc


class _Parser:
    def __init__(self, text: str, doc: Document) -> None:
        self.s = text
        self.n = len(text)
        self.pos = doc.positions
        self.keys = doc.key_positions

    def document(self) -> Any:
        i = self.ws(0)
        if i >= self.n:
            raise _SyntaxFail("the file is empty; expected a JSON object", 0)
        value, i = self.value(i, (), 0)
        i = self.ws(i)
        if i < self.n:
            raise _SyntaxFail("unexpected text after the end of the JSON document", i)
        return value

    def ws(self, i: int) -> int:
        s, n = self.s, self.n
        while i < n:
            c = s[i]
            if c in _WS:
                i += 1
            elif c == "/" and s.startswith(("//", "/*"), i):
                raise _SyntaxFail("comments are not allowed in JSON", i)
            else:
                break
        return i

    def value(self, i: int, path: Path_, depth: int) -> tuple[Any, int]:
        if i >= self.n:
            raise _SyntaxFail("unexpected end of the file; expected a value", i)
        self.pos[path] = i
        c = self.s[i]
        if c == "{":
            return self.object(i, path, depth + 1)
        if c == "[":
            return self.array(i, path, depth + 1)
        if c == '"':
            return self.string(i)
        if c == "-" or c.isdigit():
            return self.number(i)
        m = _WORD.match(self.s, i)
        word = m.group() if m else ""
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word], i + len(word)
        if word in ("NaN", "Infinity"):
            raise _SyntaxFail(f"{word} is not a JSON number", i)
        if word in ("True", "False", "None", "undefined"):
            spelled = {"True": "true", "False": "false"}.get(word, "null")
            raise _SyntaxFail(f"unexpected {word!r}; JSON spells it {spelled}", i)
        if c == "'":
            raise _SyntaxFail("strings must use double quotes", i)
        if word:
            raise _SyntaxFail(f"unexpected word {word!r}; strings must be in double quotes", i)
        if c in "]}":
            raise _SyntaxFail(f"unexpected {c!r}; expected a value", i)
        raise _SyntaxFail(f"unexpected character {c!r}; expected a value", i)

    def string(self, i: int) -> tuple[str, int]:
        try:
            return json.decoder.scanstring(self.s, i + 1, True)  # type: ignore[attr-defined]
        except json.JSONDecodeError as e:
            msg = e.msg
            if msg.startswith("Unterminated string"):
                raise _SyntaxFail("a string is not closed (missing '\"')", i) from None
            if msg.startswith("Invalid control character"):
                msg = (
                    "a control character (a tab or line break) in a string; write it as \\t or \\n"
                )
            elif msg.startswith("Invalid \\escape"):
                msg = (
                    'invalid escape in a string; allowed: \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX'
                )
            else:
                msg = msg[0].lower() + msg[1:]
            raise _SyntaxFail(msg, e.pos) from None

    def number(self, i: int) -> tuple[int | float, int]:
        m = _NUMBER.match(self.s, i)
        if not m:
            if self.s.startswith("-Infinity", i):
                raise _SyntaxFail("-Infinity is not a JSON number", i)
            raise _SyntaxFail("invalid number", i)
        end = m.end()
        if end < self.n and (self.s[end].isalnum() or self.s[end] == "."):
            raise _SyntaxFail("invalid number", i)
        text = m.group()
        if m.group(1) is None and m.group(2) is None:
            return int(text), end
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise _SyntaxFail("number is too large", i)
        return value, end

    def object(self, i: int, path: Path_, depth: int) -> tuple[dict[str, Any], int]:
        if depth > _MAX_DEPTH:
            raise _SyntaxFail(f"nested more than {_MAX_DEPTH} levels deep", i)
        out: dict[str, Any] = {}
        i = self.ws(i + 1)
        if i < self.n and self.s[i] == "}":
            return out, i + 1
        comma = -1
        while True:
            if i >= self.n:
                raise _SyntaxFail("unexpected end of the file inside an object", i)
            c = self.s[i]
            if c != '"':
                if c == "}" and comma >= 0:
                    raise _SyntaxFail("trailing comma before '}'", comma)
                if c == "'":
                    raise _SyntaxFail("field names must use double quotes", i)
                raise _SyntaxFail("expected a field name in double quotes", i)
            key_at = i
            key, i = self.string(i)
            if key in out:
                raise _SyntaxFail(f"duplicate field {show(key)}", key_at)
            self.keys[(*path, key)] = key_at
            i = self.ws(i)
            if i >= self.n or self.s[i] != ":":
                raise _SyntaxFail(f"expected ':' after the field name {show(key)}", i)
            value, i = self.value(self.ws(i + 1), (*path, key), depth)
            out[key] = value
            i = self.ws(i)
            if i < self.n and self.s[i] == ",":
                comma = i
                i = self.ws(i + 1)
                continue
            if i < self.n and self.s[i] == "}":
                return out, i + 1
            if i >= self.n:
                raise _SyntaxFail("unexpected end of the file; an object is not closed", i)
            raise _SyntaxFail("expected ',' or '}' after a field", i)

    def array(self, i: int, path: Path_, depth: int) -> tuple[list[Any], int]:
        if depth > _MAX_DEPTH:
            raise _SyntaxFail(f"nested more than {_MAX_DEPTH} levels deep", i)
        out: list[Any] = []
        i = self.ws(i + 1)
        if i < self.n and self.s[i] == "]":
            return out, i + 1
        while True:
            value, i = self.value(i, (*path, len(out)), depth)
            out.append(value)
            i = self.ws(i)
            if i < self.n and self.s[i] == ",":
                comma = i
                i = self.ws(i + 1)
                if i < self.n and self.s[i] == "]":
                    raise _SyntaxFail("trailing comma before ']'", comma)
                continue
            if i < self.n and self.s[i] == "]":
                return out, i + 1
            if i >= self.n:
                raise _SyntaxFail("unexpected end of the file; a list is not closed", i)
            raise _SyntaxFail("expected ',' or ']' after a list item", i)
