"""Go string semantics the Dockerfile front end must reproduce to match BuildKit byte for byte.

BuildKit is written in Go, and several of its observable results depend on Go's library
definitions rather than Python's: which characters are whitespace (`unicode.IsSpace` is not
`str.isspace`, which also takes U+001C..U+001F), how a string is quoted in a dump
(`strconv.Quote`), and how a keyword is lower-cased (`strings.ToLower` maps rune by rune, so
`İ` becomes `i`, not `i̇`).

Text is handled as `str` decoded with `surrogateescape`, so bytes that are not UTF-8 survive
as lone surrogates and are quoted back as `\\xHH` like Go does.
"""

from __future__ import annotations

import unicodedata

# unicode.IsSpace: '\t', '\n', '\v', '\f', '\r', ' ', U+0085, U+00A0 and the Z categories.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_GO_SPACE_SET = frozenset(GO_SPACE)
# The same test applied to a single byte widened to a rune, as BuildKit's byte-wise scanners do.
GO_SPACE_BYTES = frozenset(b"\t\n\v\f\r \x85\xa0")

_SIMPLE_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def is_go_space(ch: str) -> bool:
    return ch in _GO_SPACE_SET


def go_trim_space(s: str) -> str:
    """strings.TrimSpace."""
    return s.strip(GO_SPACE)


def go_trim_left_space(s: str) -> str:
    """strings.TrimLeftFunc(s, unicode.IsSpace)."""
    return s.lstrip(GO_SPACE)


def go_lower(s: str) -> str:
    """strings.ToLower: the simple (one rune to one rune) lower-case mapping."""
    if s.isascii():
        return s.lower()
    return "".join(c.lower()[0] for c in s)


def go_upper(s: str) -> str:
    """strings.ToUpper: the simple upper-case mapping (`ß` stays `ß`)."""
    if s.isascii():
        return s.upper()
    out = []
    for c in s:
        u = c.upper()
        out.append(u if len(u) == 1 else c)
    return "".join(out)


def _go_isprint(ch: str) -> bool:
    # unicode.IsPrint: letters, marks, numbers, punctuation, symbols and U+0020 only.
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _utf8_len(b: int) -> int:
    if b < 0x80:
        return 1
    if 0xC2 <= b <= 0xDF:
        return 2
    if 0xE0 <= b <= 0xEF:
        return 3
    if 0xF0 <= b <= 0xF4:
        return 4
    return 0


def go_quote(s: str | bytes) -> str:
    """strconv.Quote. A Go string is bytes, so invalid UTF-8 is quoted one byte at a time."""
    if isinstance(s, str):
        if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
            return '"' + s + '"'
        s = s.encode("utf-8", "surrogateescape")
    out = ['"']
    i = 0
    n = len(s)
    while i < n:
        b = s[i]
        width = _utf8_len(b)
        ch = None
        if width:
            try:
                ch = s[i : i + width].decode("utf-8")
            except UnicodeDecodeError:
                ch = None
            if ch is not None and len(ch) != 1:
                ch = None
        if ch is None:
            out.append(f"\\x{b:02x}")
            i += 1
            continue
        i += width
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif _go_isprint(ch):
            out.append(ch)
        elif ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def to_go_bytes(s: str) -> bytes:
    """The bytes Go would hold for `s` (the inverse of the surrogateescape decoding)."""
    return s.encode("utf-8", "surrogateescape")


def from_go_bytes(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def replace_invalid(s: str) -> str:
    """What a Go rune loop sees: each byte that is not UTF-8 reads as U+FFFD."""
    if s.isascii():
        return s
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)
