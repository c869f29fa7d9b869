"""The JSON front end: image documents (`image.v1.schema.json`) to IR.

A document is `{"schema_version": 1, "images": [...]}` or one Tensorlake-shaped image object
(`{"type": "image", "name", "tag", "base_image", "operations": [{"op", "args", "options"}]}`).
The TypeScript SDK exports this form; people may also write it by hand.

Three passes, each with its own errors:

1. `parse`: a JSON parser that keeps the offset of every value and key, so errors and step spans
   point into the file (`image.json:12:7`, the line, a caret). Stricter than `json.loads`:
   duplicate keys, NaN/Infinity, comments and trailing commas are errors, each said plainly.
2. `validate`: the published schema *is* the validator's input. `SchemaValidator` implements
   exactly the JSON Schema keywords the schema file uses (and refuses a schema that uses any
   other), so the two cannot drift apart; `tests/unit/test_jsonform_schema.py` checks agreement
   with the `jsonschema` package on fixtures and generated documents. Errors name the JSON path
   (`images[0].operations[3].args`), the value, and what is allowed (the schema's descriptions).
   A few checks the schema cannot state follow (unique image names, mount strings).
3. `lower`: each operation calls the Python DSL method of the same name on a `dsl.Image`, so the
   IR is the DSL's by construction; only the step spans are replaced by places in the JSON file
   (or by the `source` an SDK exporter recorded).
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.errors import DSLError, JSONFormError
from tlimage.source import Span

SCHEMA_VERSION = 1
SCHEMA_FILE = f"image.v{SCHEMA_VERSION}.schema.json"

Path_ = tuple[str | int, ...]  # a JSON path as keys and indices; `format_path` spells it


# -- the schema file --------------------------------------------------------------------------


def schema_path() -> Path:
    """The schema file. It ships inside the package (`tlimage/frontends/schema/`), so the same
    file is found in a source checkout and in an installed wheel; `schema/` at the repository
    root links to it."""
    return Path(__file__).resolve().parent / "schema" / SCHEMA_FILE


@cache
def schema_text() -> str:
    """The published JSON Schema (draft 2020-12), as `tl sbx image schema` prints it."""
    return schema_path().read_text(encoding="utf-8")


@cache
def schema() -> dict[str, Any]:
    return json.loads(schema_text())


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


def _described(value: Any) -> str:
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
                msg = "a control character (a tab or line break) in a string; write it as \\t or \\n"
            elif msg.startswith("Invalid \\escape"):
                msg = "invalid escape in a string; allowed: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX"
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


# -- pass 2: the schema -----------------------------------------------------------------------


class Invalid(Exception):
    """A value does not fit the schema: where, and what is wrong. `at_key` places the error at
    the member's key (an unknown field) instead of its value."""

    def __init__(self, path: Path_, message: str, *, at_key: bool = False,
                 hint: str | None = None) -> None:  # fmt: skip
        super().__init__(f"{format_path(path)}: {message}")
        self.path = path
        self.message = message
        self.at_key = at_key
        self.hint = hint


class _Quiet(Exception):
    """A quiet check failed (see `SchemaValidator.is_valid`); carries nothing."""



_TYPE_NAMES = {
    "object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "true or false", "null": "null",
}  # fmt: skip


def _is_type(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # JSON Schema: an integer is any number with a zero fractional part (1.0 counts).
    return t == "number" or isinstance(value, int) or value.is_integer()


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema defines it: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


class SchemaValidator:
    """Checks a value against a JSON Schema that uses only the keywords in `KEYWORDS`.

    Keywords are applied in a fixed order so that the first error is the most useful one:
    `$ref`, type, const/enum, string and number bounds, then for objects unknown fields before
    missing ones before member values, for lists the length before the items, then the
    combinators. Messages come from the keyword and the schema's `description`.
    """

    KEYWORDS = frozenset({
        "$ref", "type", "const", "enum", "pattern", "minimum", "maximum", "required",
        "properties", "additionalProperties", "propertyNames", "minItems", "maxItems",
        "prefixItems", "items", "anyOf", "allOf", "if", "then", "else",
    })  # fmt: skip
    ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "title", "description",
                             "default"})  # fmt: skip

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._discriminators: dict[int, tuple[str, Any] | None] = {}
        self._check_keywords(root, "#")

    def _check_keywords(self, node: Any, where: str) -> None:
        if isinstance(node, bool):
            return
        unknown = set(node) - self.KEYWORDS - self.ANNOTATIONS
        if unknown:
            raise ValueError(f"schema keyword {sorted(unknown)[0]!r} at {where} is not "
                             "implemented by SchemaValidator")  # fmt: skip
        for key in ("properties", "$defs"):
            for name, sub in node.get(key, {}).items():
                self._check_keywords(sub, f"{where}/{key}/{name}")
        for key in ("additionalProperties", "propertyNames", "items", "if", "then", "else"):
            if key in node:
                self._check_keywords(node[key], f"{where}/{key}")
        for key in ("prefixItems", "anyOf", "allOf"):
            for n, sub in enumerate(node.get(key, [])):
                self._check_keywords(sub, f"{where}/{key}/{n}")

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported, got {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def is_valid(self, value: Any, schema: Any) -> bool:
        try:
            self.check(value, schema, (), True)
        except (_Quiet, Invalid):
            return False
        return True

    def validate(self, value: Any) -> None:
        self.check(value, self.root, ())

    def check(self, value: Any, s: Any, path: Path_, quiet: bool = False) -> None:  # noqa: C901
        """Raises Invalid at the first failure; `quiet` skips composing its message."""
        if s is True:
            return
        if s is False:
            if quiet:
                raise _Quiet
            raise Invalid(path, f"{_described(value)} is not allowed here")
        desc = s.get("description")
        if "$ref" in s:
            self.check(value, self.resolve(s["$ref"]), path, quiet)
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not any(_is_type(value, t) for t in types):
                if quiet:
                    raise _Quiet
                want = " or ".join(_TYPE_NAMES[t] for t in types)
                rule = f" ({desc})" if desc else ""
                raise Invalid(path, f"expected {want}, got {_described(value)}{rule}")
        if "const" in s and not _json_equal(value, s["const"]):
            if quiet:
                raise _Quiet
            rule = f" ({desc})" if desc else ""
            raise Invalid(path, f"expected {show(s['const'])}, got {show(value)}{rule}")
        if "enum" in s and not any(_json_equal(value, e) for e in s["enum"]):
            if quiet:
                raise _Quiet
            allowed = ", ".join(show(e) for e in s["enum"])
            hint = None
            if isinstance(value, str):
                close = [e for e in s["enum"] if isinstance(e, str) and e.lower() == value.lower()]
                close = close or difflib.get_close_matches(value, [str(e) for e in s["enum"]], 1)
                hint = f"did you mean {show(close[0])}?" if close else None
            raise Invalid(path, f"{show(value)} is not allowed; allowed: {allowed}", hint=hint)
        if isinstance(value, str) and "pattern" in s:
            pat = self._patterns.get(s["pattern"])
            if pat is None:
                pat = self._patterns[s["pattern"]] = re.compile(s["pattern"])
            if not pat.search(value):
                if quiet:
                    raise _Quiet
                rule = desc or f"it must match {s['pattern']}"
                raise Invalid(path, f"{show(value)} is not allowed: {rule}")
        if _is_type(value, "number"):
            if "minimum" in s and value < s["minimum"]:
                if quiet:
                    raise _Quiet
                raise Invalid(path, f"{show(value)} is too small: {desc or 'the minimum is ' + str(s['minimum'])}")  # noqa: E501
            if "maximum" in s and value > s["maximum"]:
                if quiet:
                    raise _Quiet
                raise Invalid(path, f"{show(value)} is too large: {desc or 'the maximum is ' + str(s['maximum'])}")  # noqa: E501
        if isinstance(value, dict):
            self._check_object(value, s, path, quiet)
        if isinstance(value, list):
            self._check_array(value, s, path, quiet)
        if "anyOf" in s:
            branches = s["anyOf"]
            if not any(self.is_valid(value, b) for b in branches):
                if quiet:
                    raise _Quiet
                typed = [b for b in branches if self._accepts_type(value, b)]
                if len(typed) == 1:
                    self.check(value, typed[0], path, quiet)
                if desc and not any(isinstance(b, dict) and "type" in b for b in branches):
                    raise Invalid(path, desc)  # alternatives of one shape: the rule says it all
                if desc:
                    raise Invalid(path, f"{_described(value)} is not allowed: {desc}")
                want = " or ".join(self._describe(b) for b in branches)
                raise Invalid(path, f"expected {want}, got {_described(value)}")
        for sub in s.get("allOf", ()):
            self.check(value, sub, path, quiet)
        if "if" in s:
            test = self._discriminator(s["if"])
            if test is not None:  # {"required": [k], "properties": {k: {"const": c}}}
                holds = isinstance(value, dict) and test[0] in value \
                    and _json_equal(value[test[0]], test[1])  # fmt: skip
            else:
                holds = self.is_valid(value, s["if"])
            branch = s.get("then") if holds else s.get("else")
            if branch is not None:
                self.check(value, branch, path, quiet)

    def _check_object(self, value: dict[str, Any], s: dict[str, Any], path: Path_,
                      quiet: bool) -> None:  # fmt: skip
        props = s.get("properties", {})
        extra = s.get("additionalProperties", True)
        names = s.get("propertyNames")
        for key in value:
            if names is not None and not self.is_valid(key, names):
                if quiet:
                    raise _Quiet
                rule = self._describe(names)
                raise Invalid((*path, key), f"invalid key {show(key)}: {rule}", at_key=True)
            if key not in props and extra is False:
                if quiet:
                    raise _Quiet
                what = "option" if path and path[-1] == "options" else "field"
                if not props:
                    rule = s.get("description") or "no fields are allowed here"
                    raise Invalid((*path, key), f"unknown {what} {show(key)}: {rule}", at_key=True)
                close = [p for p in sorted(props) if p.startswith(key) or key.startswith(p)]
                close = close or difflib.get_close_matches(key, list(props), 1, cutoff=0.7)
                raise Invalid(
                    (*path, key),
                    f"unknown {what} {show(key)}; allowed: {', '.join(sorted(props))}",
                    at_key=True,
                    hint=f"did you mean {show(close[0])}?" if close else None,
                )
        for key in s.get("required", ()):
            if key not in value:
                if quiet:
                    raise _Quiet
                rule = f": {s['description']}" if key == "type" and "description" in s else ""
                raise Invalid(path, f"missing required field {show(key)}{rule}")
        for key, v in value.items():
            if key in props:
                self.check(v, props[key], (*path, key), quiet)
            elif isinstance(extra, dict):
                self.check(v, extra, (*path, key), quiet)

    def _check_array(self, value: list[Any], s: dict[str, Any], path: Path_,
                     quiet: bool) -> None:  # fmt: skip
        lo, hi = s.get("minItems"), s.get("maxItems")
        n = len(value)
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            if quiet:
                raise _Quiet
            if lo == hi:
                want = f"{lo} item{'s' if lo != 1 else ''}"
            elif lo is not None and n < lo:
                want = f"at least {lo} item{'s' if lo != 1 else ''}"
            else:
                want = f"at most {hi} item{'s' if hi != 1 else ''}"
            rule = f"; allowed: {s['description']}" if s.get("description") else ""
            raise Invalid(path, f"expected {want}, got {n}{rule}")
        prefix = s.get("prefixItems", [])
        for i, (item, sub) in enumerate(zip(value, prefix, strict=False)):
            self.check(item, sub, (*path, i), quiet)
        if "items" in s:
            for i in range(len(prefix), n):
                self.check(value[i], s["items"], (*path, i), quiet)

    def _discriminator(self, s: Any) -> tuple[str, Any] | None:
        """(key, constant) when `s` only tests that an object's `key` equals a constant: the
        op dispatch, evaluated directly (the same answer, a fraction of the calls)."""
        got = self._discriminators.get(id(s), False)
        if got is not False:
            return got  # type: ignore[return-value]
        node = s
        while isinstance(node, dict) and set(node) == {"$ref"}:
            node = self.resolve(node["$ref"])
        got = None
        if isinstance(node, dict) and set(node) == {"required", "properties"}:
            (req,), props = node["required"], node["properties"]
            if list(props) == [req] and set(props[req]) == {"const"}:
                got = (req, props[req]["const"])
        self._discriminators[id(s)] = got
        return got

    def _accepts_type(self, value: Any, s: Any) -> bool:
        while isinstance(s, dict) and "type" not in s and "$ref" in s:
            s = self.resolve(s["$ref"])
        if not isinstance(s, dict) or "type" not in s:
            return False
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        return any(_is_type(value, t) for t in types)

    def _describe(self, s: Any) -> str:
        while isinstance(s, dict) and "$ref" in s and "description" not in s:
            s = self.resolve(s["$ref"])
        if isinstance(s, dict) and s.get("description"):
            return s["description"]
        if isinstance(s, dict) and "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            return " or ".join(_TYPE_NAMES[t] for t in types)
        return "a valid value"


@cache
def validator() -> SchemaValidator:
    return SchemaValidator(schema())


# -- pass 3: lowering -------------------------------------------------------------------------


@dataclass
class _Context:
    """Where errors and step spans point. `doc` positions are used when `in_text` (a JSON file a
    person reads); `source` fields written by an SDK exporter take over for step spans always,
    and for errors when the JSON text is not a file (exported on the fly)."""

    doc: Document
    in_text: bool
    _source_files: dict[str, str] = field(default_factory=dict)  # shown path -> path as given

    def fail(self, err: Invalid | str, path: Path_ = (), *, at_key: bool = False,
             hint: str | None = None) -> JSONDocumentError:  # fmt: skip
        if isinstance(err, Invalid):
            path, message, at_key, hint = err.path, err.message, err.at_key, err.hint or hint
        else:
            message = err
        if self.in_text:
            span, text = self.doc.span(path, key=at_key), self.doc.text
        else:  # the SDK source the operation came from, read now (linecache may be stale)
            span = self.source_near(path)
            text = _read_text(self._source_files.get(span.file, span.file)) if span else None
        return JSONDocumentError(
            message, format_path(path), file=self.doc.file, span=span, text=text, hint=hint
        )

    def step_span(self, obj: dict[str, Any], path: Path_) -> Span | None:
        return self._source_span(obj) or (self.doc.span(path) if self.in_text else None)

    def source_near(self, path: Path_) -> Span | None:
        """The `source` of the innermost image or operation that encloses `path`."""
        node_at: list[Any] = [self.doc.value]
        for part in path:
            try:
                node_at.append(node_at[-1][part])
            except (KeyError, IndexError, TypeError):
                break
        for node in reversed(node_at):
            span = self._source_span(node)
            if span is not None:
                return span
        return None

    def _source_span(self, node: Any) -> Span | None:
        src = node.get("source") if isinstance(node, dict) else None
        if not isinstance(src, dict) or not isinstance(src.get("file"), str):
            return None
        shown = _display_path(src["file"])
        self._source_files[shown] = src["file"]
        return Span(shown, int(src.get("line", 1)), int(src.get("column", 1)))


def _read_text(file: str) -> str | None:
    try:
        return Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _display_path(file: str) -> str:
    """Absolute paths under the working directory are shown relative to it."""
    if not os.path.isabs(file):
        return file
    cwd = os.getcwd()
    return os.path.relpath(file, cwd) if file.startswith(cwd + os.sep) else file


def load_json_images(path: str | Path) -> list[ir.ImageDef]:
    """All images of a JSON image document. The path is kept as given, so spans read as the
    user typed it."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise JSONDocumentError(
            f"the file is not UTF-8 (byte {e.start}, line {line})", file=str(p)
        ) from None
    return load_json_text(text, str(p))


def load_json_text(text: str, file: str, *, in_text: bool = True) -> list[ir.ImageDef]:
    """Images from JSON text. `in_text=False` is for JSON produced on the fly (SDK exporters):
    errors then point at the `source` of the operation they are in, not into the text."""
    doc = parse(text, file)
    ctx = _Context(doc, in_text)
    bad = ir.codec.find_surrogate(doc.value)
    if bad is not None:
        raise ctx.fail(f"the string {bad[1]!r} holds a lone surrogate (\\ud800-\\udfff), which is "
                       "not text", bad[0])  # fmt: skip
    try:
        validator().validate(doc.value)
    except Invalid as e:
        raise ctx.fail(e) from None
    return _lower(doc.value, ctx)


def images_of(value: dict[str, Any]) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """(path, image object) for each image of a validated document."""
    if "images" in value or "schema_version" in value:
        for i, img in enumerate(value["images"]):
            yield ("images", i), img
    else:
        yield (), value


def _lower(value: dict[str, Any], ctx: _Context) -> list[ir.ImageDef]:
    out: list[ir.ImageDef] = []
    seen: dict[str, Path_] = {}
    for path, obj in images_of(value):
        name = obj.get("name", "default")
        if name in seen:
            raise ctx.fail(
                f"{show(name)} is already the name of {format_path(seen[name]) or 'an image'}",
                (*path, "name") if "name" in obj else path,
                hint="give each image of a document its own name",
            )
        seen[name] = path
        out.append(_lower_image(obj, path, ctx))
    return out


def _lower_image(obj: dict[str, Any], path: Path_, ctx: _Context) -> ir.ImageDef:
    from tlimage.frontends import dsl

    def call(fn: Callable[[], dsl.Image], at: Path_) -> dsl.Image:
        try:
            return fn()
        except DSLError as e:  # the schema let through something the DSL refuses
            raise ctx.fail(_METHOD_PREFIX.sub("", e.message), at, hint=e.hint) from None

    img = call(lambda: dsl.Image(obj.get("name", "default"), obj.get("tag", "latest"),
                                 obj.get("base_image", dsl.DEFAULT_BASE_IMAGE)), path)  # fmt: skip
    spans: list[Span | None] = []
    for i, op in enumerate(obj.get("operations", ())):
        op_path = (*path, "operations", i)
        _check_mounts(op, op_path, ctx)
        before = len(img.steps)
        img = call(lambda op=op, img=img: _apply(img, op), op_path)
        if len(img.steps) > before:  # an empty RUN/COPY/EXPOSE/VOLUME adds no step
            spans.append(ctx.step_span(op, op_path))
    lowered = img.to_ir()
    stage = lowered.stages[0]
    metas = (
        ir.StepMeta(span=ctx.step_span(obj, path)),
        *(ir.StepMeta(span=s, force=m.force) for s, m in zip(spans, stage.meta[1:], strict=True)),
    )
    return ir.ImageDef(
        name=lowered.name,
        tag=lowered.tag,
        stages=(ir.Stage(stage.name, stage.steps, metas),),
    )


_METHOD_PREFIX = re.compile(r"^\w+\(\): ")


def _int(v: Any) -> Any:
    """Integral numbers as int (JSON Schema's "integer" admits 1.0; the DSL wants an int)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _apply(img: Any, op: dict[str, Any]) -> Any:
    """One operation as the DSL call of the same name; the document is already validated."""
    name, args, opts = op["op"], op["args"], op.get("options") or {}
    if name == "RUN":
        return img.run(args, opts)
    if name in ("COPY", "ADD"):
        return getattr(img, name.lower())(args[0], args[1], opts)
    if name == "ENV":
        return img.env(args[0], args[1])
    if name == "WORKDIR":
        return img.workdir(args[0])
    if name == "USER":
        return img.user(_int(args[0]))
    if name in ("ENTRYPOINT", "CMD"):
        return getattr(img, name.lower())(args[0] if opts.get("shell") else args)
    if name == "LABEL":
        return img.label(args[0], args[1])
    if name == "ARG":
        return img.arg(*args)
    if name == "EXPOSE":
        return img.expose(*(_int(a) for a in args))
    if name == "SHELL":
        return img.shell(args)
    if name == "STOPSIGNAL":
        return img.stopsignal(_int(args[0]))
    if name == "HEALTHCHECK":
        command = None if not args else args[0] if opts.get("shell") else args
        timing = {k: opts[k] for k in ("interval", "timeout", "start_period", "start_interval")
                  if k in opts}  # fmt: skip
        if "retries" in opts:
            timing["retries"] = _int(opts["retries"])
        return img.healthcheck(command, **timing)
    if name == "VOLUME":
        return img.volume(*args)
    raise AssertionError(f"operation {name} passed validation but has no lowering")


def _check_mounts(op: dict[str, Any], path: Path_, ctx: _Context) -> None:
    """Each mount (a spec string or an object) read by the parser every front end shares, so
    that a bad one is reported at its own JSON path (`operations[2].options.mounts[0]`)."""
    from tlimage.frontends.mounts import mount_from_user
    from tlimage.frontends.problem import Problem

    opts = op.get("options") or {}
    if op["op"] != "RUN" or not opts.get("mounts"):
        return
    for i, m in enumerate(opts["mounts"]):
        try:
            mount_from_user(m)
        except Problem as e:
            raise ctx.fail(e.message, (*path, "options", "mounts", i), hint=e.hint) from None


