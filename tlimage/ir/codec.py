"""Plain-object codec for IR values, and the canonical encoding that digests are taken over.

`to_obj` turns a step (or any IR dataclass) into JSON-able objects, omitting fields at their
default; `from_obj` reverses it using the dataclass type hints, so tuples, pairs, nested mounts and
optionals come back exactly. `canonical` is the deterministic byte form: sorted keys, no
whitespace, UTF-8, the op name and `IR_VERSION` inside.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import cache
from typing import Any, Literal, get_args, get_origin

from tlimage.ir.steps import STEP_TYPES, Step

# Bumped whenever the encoding of an existing step changes (every digest and cached layer is
# invalidated, deliberately). 2: RUN mounts are typed per kind, defaults filled in.
IR_VERSION = 2


class DecodeError(ValueError):
    """A plain object does not fit the IR type; `path` says where (`mounts[0].type`)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.message = message
        self.path = path


def field_name(name: str) -> str:
    """The external spelling of a field: `from_` is `from`."""
    return name[:-1] if name.endswith("_") else name


@cache
def _fields(cls: type) -> tuple[tuple[str, str, Any, Any], ...]:
    """(attribute, external name, type hint, default) for each field of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        out.append((f.name, field_name(f.name), hints[f.name], default))
    return tuple(out)


def _tag(cls: type) -> str | None:
    """The kind a member of a tagged union (the RUN mounts) writes as its "type" field."""
    tag = cls.__dict__.get("type")
    return tag if isinstance(tag, str) else None


def to_obj(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        obj: dict[str, Any] = {}
        tag = _tag(type(value))
        if tag is not None:
            obj["type"] = tag
        for attr, name, _hint, default in _fields(type(value)):
            v = getattr(value, attr)
            if default is not dataclasses.MISSING and v == default:
                continue
            obj[name] = to_obj(v)
        return obj
    if isinstance(value, tuple):
        return [to_obj(v) for v in value]
    return value


def step_to_obj(step: Step) -> dict[str, Any]:
    return {"op": step.op, **to_obj(step)}


def step_from_obj(obj: Any, path: str = "") -> Step:
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise DecodeError("expected an object with an 'op' string", path)
    cls = STEP_TYPES.get(obj["op"])
    if cls is None:
        raise DecodeError(
            f"unknown op {obj['op']!r}; known: {', '.join(sorted(STEP_TYPES))}", _join(path, "op")
        )
    body = {k: v for k, v in obj.items() if k != "op"}
    return from_obj(cls, body, path)


def from_obj(hint: Any, value: Any, path: str = "") -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise DecodeError(f"expected an object, got {_kind(value)}", path)
        known = {name: (attr, h) for attr, name, h, _ in _fields(hint)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise DecodeError(
                f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(known))}",
                _join(path, unknown[0]),
            )
        kwargs = {attr: from_obj(h, value[name], _join(path, name))
                  for name, (attr, h) in known.items() if name in value}  # fmt: skip
        try:
            return hint(**kwargs)
        except TypeError as e:  # a required field is missing
            raise DecodeError(str(e).replace("__init__() ", ""), path) from None
        except ValueError as e:
            raise DecodeError(str(e), path) from None
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # a tagged union: the "type" field picks the member
            return _from_tagged(inner, value, path)
        return from_obj(inner[0], value, path)
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, list):
            raise DecodeError(f"expected a list, got {_kind(value)}", path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_obj(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DecodeError(f"expected a list of {len(args)} items, got {len(value)}", path)
        return tuple(
            from_obj(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise DecodeError(
                f"{value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}", path
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"expected true or false, got {_kind(value)}", path)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"expected an integer, got {_kind(value)}", path)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise DecodeError(f"expected a string, got {_kind(value)}", path)
        return value
    raise TypeError(f"unsupported IR type {hint!r}")  # a bug in the IR definition, not input


def _from_tagged(members: list[Any], value: Any, path: str) -> Any:
    by_tag = {_tag(m): m for m in members}
    if not isinstance(value, dict):
        raise DecodeError(f"expected an object, got {_kind(value)}", path)
    tag = value.get("type")
    if tag not in by_tag:
        raise DecodeError(
            f"{tag!r} is not allowed; allowed: {', '.join(map(repr, sorted(by_tag)))}",
            _join(path, "type"),
        )
    return from_obj(by_tag[tag], {k: v for k, v in value.items() if k != "type"}, path)


def canonical(obj: Any) -> bytes:
    """The deterministic byte encoding that digests are computed over. Text read from a file
    that is not UTF-8 carries its bytes as surrogate escapes (a Dockerfile is read that way, as
    Buildah takes its bytes) and encodes back to those bytes. Front ends refuse other lone
    surrogates (`find_surrogate`)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8", "surrogateescape")


def find_surrogate(value: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """(path, string) of the first string in a plain value (dicts, lists, tuples) that holds a
    lone surrogate code point, which is not text and has no UTF-8 encoding; None if none."""
    if isinstance(value, str):
        for ch in value:
            if "\ud800" <= ch <= "\udfff":
                return path, value
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = find_surrogate(k, path) or find_surrogate(v, (*path, k))
            if hit:
                return hit
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            hit = find_surrogate(v, (*path, i))
            if hit:
                return hit
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    return {
        type(None): "null", bool: "a boolean", int: "a number", float: "a number",
        str: "a string", list: "a list", dict: "an object",
    }.get(type(value), type(value).__name__)  # fmt: skip
