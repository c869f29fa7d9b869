"""Pass 2 of the JSON front end: the published schema file and the validator that takes it as
its input (exactly the JSON Schema keywords the file uses)."""

from __future__ import annotations

import difflib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from tlimage.frontends.jsonform.jsonparse import Path_, described, format_path, show

SCHEMA_VERSION = 1
SCHEMA_FILE = f"image.v{SCHEMA_VERSION}.schema.json"


# -- the schema file --------------------------------------------------------------------------


def schema_path() -> Path:
    """The schema file. It ships inside the package (`tlimage/frontends/schema/`), so the same
    file is found in a source checkout and in an installed wheel; `schema/` at the repository
    root links to it."""
    return Path(__file__).resolve().parent.parent / "schema" / SCHEMA_FILE


@cache
def schema_text() -> str:
    """The published JSON Schema (draft 2020-12), as `tl sbx image schema` prints it."""
    return schema_path().read_text(encoding="utf-8")


@cache
def schema() -> dict[str, Any]:
    return json.loads(schema_text())


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
            raise Invalid(path, f"{described(value)} is not allowed here")
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
                raise Invalid(path, f"expected {want}, got {described(value)}{rule}")
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
                raise Invalid(
                    path,
                    f"{show(value)} is too small: {desc or 'the minimum is ' + str(s['minimum'])}",
                )  # noqa: E501
            if "maximum" in s and value > s["maximum"]:
                if quiet:
                    raise _Quiet
                raise Invalid(
                    path,
                    f"{show(value)} is too large: {desc or 'the maximum is ' + str(s['maximum'])}",
                )  # noqa: E501
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
                    raise Invalid(path, f"{described(value)} is not allowed: {desc}")
                want = " or ".join(self._describe(b) for b in branches)
                raise Invalid(path, f"expected {want}, got {described(value)}")
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
