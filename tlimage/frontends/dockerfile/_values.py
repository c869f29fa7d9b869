"""Value syntaxes of Dockerfile flags, parsed the way BuildKit's Go code parses them.

- `parse_duration`: Go's `time.ParseDuration` (HEALTHCHECK `--interval=1m30s`), in nanoseconds.
- `parse_bool`: Go's `strconv.ParseBool` (`--mount=...,ro=true`).
- `parse_uint`: Go's `strconv.ParseUint` for a base and bit size (`mode=0755`, `uid=1000`).
- `ram_in_bytes`: docker/go-units `RAMInBytes` (tmpfs `size=64m`, binary multiples).
- `read_csv_record`: one record of Go's `encoding/csv` (the `--mount=` value), with the grammar
  in `grammar/dockerfile_mount.lark`.

Each raises `ValueError` with Go's message text; callers attach the source location.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_DURATION = (1 << 63) - 1


def _time_quote(s: str) -> str:
    """The `time` package's own quoting: non-ASCII and control bytes as \\xHH."""
    out = ['"']
    for ch in s:
        if ord(ch) >= 0x80 or ch < " ":
            for b in ch.encode("utf-8", "surrogateescape"):
                out.append(f"\\x{b:02x}")
        else:
            if ch in '"\\':
                out.append("\\")
            out.append(ch)
    out.append('"')
    return "".join(out)


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration: `[-+]?([0-9]*(\\.[0-9]*)?[a-z]+)+` or `0`, in nanoseconds."""
    invalid = ValueError(f"time: invalid duration {_time_quote(text)}")
    s = text
    neg = False
    if s and s[0] in "-+":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise invalid
    total = 0
    n = len(s)
    i = 0
    while i < n:
        if not (s[i] == "." or "0" <= s[i] <= "9"):
            raise invalid
        start = i
        v = 0
        while i < n and "0" <= s[i] <= "9":
            if v > (1 << 63) // 10:
                raise invalid
            v = v * 10 + ord(s[i]) - 48
            if v > 1 << 63:
                raise invalid
            i += 1
        pre = i != start
        f, scale, post = 0, 1.0, False
        if i < n and s[i] == ".":
            i += 1
            start = i
            overflow = False
            while i < n and "0" <= s[i] <= "9":
                if not overflow:
                    if f > ((1 << 63) - 1) // 10:
                        overflow = True
                    else:
                        y = f * 10 + ord(s[i]) - 48
                        if y > 1 << 63:
                            overflow = True
                        else:
                            f = y
                            scale *= 10
                i += 1
            post = i != start
        if not pre and not post:
            raise invalid
        start = i
        while i < n and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == start:
            raise ValueError(f"time: missing unit in duration {_time_quote(text)}")
        name = s[start:i]
        unit = _UNITS.get(name)
        if unit is None:
            raise ValueError(
                f"time: unknown unit {_time_quote(name)} in duration {_time_quote(text)}"
            )
        if v > (1 << 63) // unit:
            raise invalid
        v *= unit
        if f > 0:
            v += int(float(f) * (float(unit) / scale))
            if v > 1 << 63:
                raise invalid
        total += v
        if total > 1 << 63:
            raise invalid
    if neg:
        return -total
    if total > _MAX_DURATION:
        raise invalid
    return total


_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f'strconv.ParseBool: parsing "{text}": invalid syntax')


def parse_uint(text: str, base: int, bits: int) -> int:
    """strconv.ParseUint without base prefixes or underscores (base is 8 or 10 here)."""
    digits = "01234567" if base == 8 else "0123456789"
    if not text or any(c not in digits for c in text):
        raise ValueError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    value = int(text, base)
    if value >= 1 << bits:
        raise ValueError(f'strconv.ParseUint: parsing "{text}": value out of range')
    return value


def parse_int(text: str, bits: int) -> int:
    """strconv.ParseInt(text, 10, bits)."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or any(c not in "0123456789" for c in body):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": invalid syntax')
    value = int(text)
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": value out of range')
    return value


_RAM = re.compile(r"(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?\Z")
_RAM_MULT = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def ram_in_bytes(text: str) -> int:
    """docker/go-units RAMInBytes: `64m` is 64 MiB; a bare number is bytes."""
    m = _RAM.match(text)
    if not m:
        raise ValueError(f"invalid size: '{text}'")
    try:
        size = float(m.group(1))
    except ValueError:
        raise ValueError(f"invalid size: '{text}'") from None
    unit = (m.group(2) or "").lower()
    if unit:
        size *= _RAM_MULT[unit]
    return int(size)


class CSVError(ValueError):
    """A malformed CSV record; `column` is 1-based within the record."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


def read_csv_record(text: str) -> list[str]:
    """The first record of `text` as Go's csv.Reader.Read returns it."""
    from lark.exceptions import UnexpectedInput

    from tlimage import _grammar

    if text == "":
        raise CSVError("EOF", 1)
    line = text.split("\n", 1)[0]
    if line.endswith("\r"):
        line = line[:-1]
    try:
        tree = _grammar.load("dockerfile_mount").parse(line)
    except UnexpectedInput as e:
        pos = getattr(e, "pos_in_stream", None)
        if pos is None:
            pos = len(line)
        token = getattr(e, "token", None)
        if token is not None and getattr(token, "start_pos", None) is not None:
            pos = token.start_pos
        # A quote that does not open a field is a bare quote; anything else wrong is about a
        # quoted field (text after its closing quote, or no closing quote at all).
        if pos < len(line) and line[pos] == '"' and pos > 0 and line[pos - 1] != ",":
            raise CSVError(
                f'parse error on line 1, column {pos + 1}: bare " in non-quoted-field', pos + 1
            ) from None
        if pos < len(line) and line[pos] == '"':
            col = len(line) + 1
        else:
            col = pos
        raise CSVError(
            f'parse error on line 1, column {col}: extraneous or missing " in quoted-field', col
        ) from None
    fields = []
    for node in tree.children:
        if node.data == "quoted":
            fields.append(str(node.children[0])[1:-1].replace('""', '"'))
        elif node.data == "bare":
            fields.append(str(node.children[0]))
        else:
            fields.append("")
    return fields
