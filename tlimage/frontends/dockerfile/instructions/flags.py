"""Instruction flags: BuildKit's BFlags (declare what an instruction accepts, then parse the
raw `--name=value` cells) and the "did you mean" suggestion for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from tlimage.frontends.dockerfile._gostr import go_lower
from tlimage.frontends.problem import Problem


def suggest(value: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(go_lower(value), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# ---------------------------------------------------------------------------------- flags


class Flags:
    """BuildKit's BFlags: declare what an instruction accepts, then `parse()` the raw flags.
    Boolean flags take no value or true/false; string flags need `=value`; `strings` flags
    may repeat."""

    def __init__(self, raw: tuple[str, ...]) -> None:
        self.raw = raw
        self.kinds: dict[str, str] = {}
        self.values: dict[str, object] = {}
        self.used: list[str] = []

    def bool(self, name: str, default: bool = False) -> None:
        self.kinds[name] = "bool"
        self.values[name] = default

    def string(self, name: str, default: str = "") -> None:
        self.kinds[name] = "string"
        self.values[name] = default

    def strings(self, name: str) -> None:
        self.kinds[name] = "strings"
        self.values[name] = []

    def parse(self) -> Flags:
        for arg in self.raw:
            if not arg.startswith("--"):
                raise Problem(f"arg should start with -- : {arg}", arg)
            if arg == "--":
                break
            name, eq, value = arg[2:].partition("=")
            kind = self.kinds.get(name)
            needle = "--" + name
            if kind is None:
                raise Problem(f"unknown flag: {name}{suggest(name, self.kinds)}", needle)
            if name in self.used and kind != "strings":
                raise Problem(f"duplicate flag specified: {name}", needle)
            self.used.append(name)
            if kind == "bool":
                if eq and value == "":
                    raise Problem(f"missing a value on flag: {name}", needle)
                lower = go_lower(value)
                if lower in ("", "true"):
                    self.values[name] = True
                elif lower == "false":
                    self.values[name] = False
                else:
                    raise Problem(f"expecting boolean value for flag {name}, not: {value}", needle)
            elif not eq:
                raise Problem(f"missing a value on flag: {name}", needle)
            elif kind == "string":
                self.values[name] = value
            else:
                self.values[name].append(value)  # type: ignore[attr-defined]
        return self

    def __getitem__(self, name: str):  # str, bool or list, as declared
        return self.values[name]
