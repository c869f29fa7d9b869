"""Dockerfile parsing, stage one: text to an untyped syntax tree, exactly as BuildKit splits it.

The result keeps, per instruction, the keyword as written, the raw `--flags`, and the raw
argument cells BuildKit's parser builds (quotes, escapes and `$VARS` untouched), so that
`dump()` reproduces BuildKit's s-expression dump byte for byte. Nothing is validated beyond
what BuildKit's parser rejects: unknown instructions and unknown flags pass through here and
are rejected by the typed `instructions` stage, as in BuildKit.

How a file is read (BuildKit's line-based algorithm, which this module follows step by step):

1. Physical lines split at `\\n`; each has trailing `\\r`/`\\n` removed. A UTF-8 BOM is
   dropped from the first line.
2. Parser directives (`# syntax=`, `# escape=`, `# check=`) count only until the first line
   that is not one; `escape` sets the escape token (`\\` or a backtick).
3. Blank lines and comment lines (first non-blank character `#`) between instructions are
   skipped. A line ending in the escape token continues on the next line; inside a
   continuation, comment lines are skipped and blank lines are skipped with a warning.
   Continued lines are joined without a separator and without stripping their indentation.
4. The logical line is split into keyword, `--flags` and the rest, and the rest into argument
   cells by the instruction's rule (JSON array, whitespace fields, key/value pairs, ...).
5. RUN/COPY/ADD (also under ONBUILD) in shell form read `<<WORD` heredoc bodies from the
   following physical lines.

This is a hand-written scanner rather than a grammar on purpose: the continuation rule is a
regular expression over each physical line, the escape token changes mid-file, the flag
scanner works on bytes, and heredoc bodies are raw lines; a grammar would have to encode each
of these quirks indirectly, and byte-identical output is the contract.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from tlimage.errors import DockerfileError
from tlimage.frontends.dockerfile._gostr import (
    GO_SPACE,
    GO_SPACE_BYTES,
    from_go_bytes,
    go_lower,
    go_quote,
    go_trim_left_space,
    go_trim_space,
    is_go_space,
    replace_invalid,
    to_go_bytes,
)
from tlimage.frontends.dockerfile.shell import ShellError, ShellLex
from tlimage.source import Span

__all__ = [
    "Directive",
    "Dockerfile",
    "DockerfileParseError",
    "Heredoc",
    "Instruction",
    "ParseWarning",
    "dump",
    "dump_instruction",
    "parse",
    "parse_file",
]

MAX_LINE_BYTES = 65535  # bufio.MaxScanTokenSize - 1

_WS = re.compile(r"[\t\v\f\r ]+")
_GO_SPACE_RUN = re.compile("[" + re.escape(GO_SPACE) + "]+")
_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*\Z")
_HEREDOC = re.compile(r"([0-9]*)<<(-?)[\t\n\f\r ]*([^<]*)\Z")
VALID_DIRECTIVES = ("syntax", "escape", "check")
HEREDOC_COMMANDS = frozenset({"add", "copy", "run"})

# How each instruction's rest becomes argument cells (BuildKit's dispatch table).
_RULES = {
    "add": "json_or_list",
    "arg": "name_or_name_val",
    "cmd": "maybe_json",
    "copy": "json_or_list",
    "entrypoint": "maybe_json",
    "env": "env",
    "expose": "fields",
    "from": "fields",
    "healthcheck": "health",
    "label": "label",
    "maintainer": "string",
    "onbuild": "sub",
    "run": "maybe_json",
    "shell": "maybe_json",
    "stopsignal": "string",
    "user": "string",
    "volume": "json_or_list",
    "workdir": "string",
}
KNOWN_COMMANDS = frozenset(_RULES)


class DockerfileParseError(DockerfileError):
    """The file does not parse. `str()` is `file:line:col: message`, the line, and a caret."""


@dataclass(frozen=True, slots=True)
class Heredoc:
    """A `<<WORD` body. `content` is the raw lines, newlines included; `chomp` (`<<-`) only
    affected how the terminator was matched, the leading tabs are still in `content`.
    `fd` is 0 when none was written (`3<<EOF` gives 3). `expand` is False when any part of
    the delimiter word was quoted."""

    name: str
    fd: int
    expand: bool
    chomp: bool
    content: str

    def chomped(self) -> str:
        """The content with each line's leading tabs removed (what `<<-` means)."""
        return re.sub(r"(?m)^\t+", "", self.content) if self.chomp else self.content


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction. `args` are BuildKit's raw argument cells; for ONBUILD they are empty
    and `sub` holds the wrapped instruction. Lines are 1-based and inclusive and cover the
    heredoc bodies; `col` is where the keyword starts on `start_line`."""

    keyword: str
    flags: tuple[str, ...]
    args: tuple[str, ...]
    json: bool
    original: str
    start_line: int
    end_line: int
    col: int = 1
    heredocs: tuple[Heredoc, ...] = ()
    sub: Instruction | None = None
    comments: tuple[str, ...] = ()
    logical_end_line: int = 0  # last line of the instruction text itself, before heredoc bodies

    @property
    def command(self) -> str:
        """The keyword in lower case (`run`), what BuildKit dispatches on."""
        return go_lower(self.keyword)


@dataclass(frozen=True, slots=True)
class Directive:
    name: str  # lower case: syntax, escape or check
    value: str
    line: int


@dataclass(frozen=True, slots=True)
class ParseWarning:
    short: str
    line: int
    detail: str = ""
    url: str = ""

    def __str__(self) -> str:
        return self.short


@dataclass(frozen=True, slots=True)
class Dockerfile:
    """A parsed file. `start_line`/`end_line` span the instructions (directives and the blank
    lines around them excluded). `text` is the decoded source, for error rendering."""

    file: str
    instructions: tuple[Instruction, ...]
    directives: tuple[Directive, ...]
    escape: str
    warnings: tuple[ParseWarning, ...]
    start_line: int
    end_line: int
    text: str = field(repr=False, default="")

    def directive(self, name: str) -> str | None:
        for d in self.directives:
            if d.name == name:
                return d.value
        return None

    def __iter__(self) -> Iterator[Instruction]:
        return iter(self.instructions)

    def __len__(self) -> int:
        return len(self.instructions)


# --------------------------------------------------------------------------------------- dump


def dump_instruction(ins: Instruction) -> str:
    """One instruction in BuildKit's `Node.Dump` form, without the surrounding parentheses."""
    parts = [go_lower(ins.keyword)]
    if ins.flags:
        parts.append(" [" + " ".join(go_quote(f) for f in ins.flags) + "]")
    if ins.sub is not None:
        parts.append(" (" + dump_instruction(ins.sub) + ")")
    for a in ins.args:
        parts.append(" " + go_quote(a))
    return go_trim_space("".join(parts))


def dump(ast: Dockerfile) -> str:
    """BuildKit's `result` format: one `(...)` line per instruction, no final newline."""
    return "\n".join("(" + dump_instruction(i) + ")" for i in ast.instructions)


# ------------------------------------------------------------------------------------ parsing


def parse_file(path: str) -> Dockerfile:
    with open(path, "rb") as f:
        return parse(f.read(), str(path))


def parse(source: bytes | str, file: str = "Dockerfile") -> Dockerfile:
    """Parse a Dockerfile. `source` bytes are decoded as UTF-8; bytes that are not valid UTF-8
    are kept (as surrogate escapes) and dumped as `\\xHH`. Raises `DockerfileParseError`."""
    if isinstance(source, bytes):
        text = source.decode("utf-8", "surrogateescape")
    else:
        text = source
        bad = _LONE_SURROGATE.search(text)
        if bad is not None:  # not a byte escape: not text at all
            line = text.count("\n", 0, bad.start()) + 1
            col = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
            raise DockerfileParseError(
                f"the text holds a lone surrogate ({bad.group()!r}), which is not text",
                Span(file, line, col),
                text=text.encode("utf-8", "replace").decode(),
            )
    return _Parser(text, file).run()


# Surrogates other than the escapes of undecodable bytes (U+DC80..U+DCFF).
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


@dataclass(slots=True)
class _Node:
    keyword: str
    flags: tuple[str, ...]
    args: tuple[str, ...]
    json: bool
    original: str
    sub: _Node | None = None


class _Parser:
    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        pieces = text.split("\n")
        lines = [p + "\n" for p in pieces[:-1]]
        if pieces[-1]:
            lines.append(pieces[-1])
        self.lines = lines
        self.escape = "\\"
        self.directives_done = False
        self.directives: list[Directive] = []
        self.seen: set[str] = set()

    # errors ---------------------------------------------------------------------------------

    def error(
        self,
        message: str,
        line: int,
        col: int = 1,
        end_line: int | None = None,
        width: int = 1,
    ) -> DockerfileParseError:
        """An error at `line`:`col`, underlining `width` characters. `end_line` (the last line
        of the instruction) is accepted for callers' clarity; the caret stays on one line."""
        line = max(line, 1)
        col = max(col, 1)
        span = Span(self.file, line, col, line, col + max(1, width))
        return DockerfileParseError(message, span, text=self.text)

    def column_of(self, needle: str, line: int) -> int:
        """1-based column of `needle` on physical line `line`, or 1."""
        if needle and 0 < line <= len(self.lines):
            idx = self.lines[line - 1].find(needle)
            if idx >= 0:
                return idx + 1
        return 1

    def locate(self, needle: str, start: int, end: int) -> tuple[int, int] | None:
        """(line, column) of the first `needle` on lines `start`..`end`, or None."""
        if needle:
            for ln in range(max(start, 1), min(end, len(self.lines)) + 1):
                idx = self.lines[ln - 1].find(needle)
                if idx >= 0:
                    return ln, idx + 1
        return None

    # directives -----------------------------------------------------------------------------

    def directive(self, token: str, lineno: int) -> bool:
        """BuildKit's DirectiveParser.ParseLine: True when `token` was a directive."""
        if self.directives_done:
            return False
        if not token.startswith("#"):
            self.directives_done = True
            return False
        m = _DIRECTIVE.match(go_trim_left_space(token[1:]))
        if not m:
            self.directives_done = True
            return False
        key = go_lower(m.group(1))
        if key not in VALID_DIRECTIVES:
            self.directives_done = True
            return False
        value = m.group(2)
        col = self.column_of(m.group(1), lineno)
        if key in self.seen:
            raise self.error(
                f"only one {key} parser directive can be used", lineno, col, width=len(m.group(1))
            )
        self.seen.add(key)
        if key == "escape":
            if value not in ("\\", "`"):
                raise self.error(
                    f"invalid escape token '{value}' does not match ` or \\",
                    lineno,
                    self.column_of(value, lineno),
                    width=len(value),
                )
            self.escape = value
        self.directives.append(Directive(key, value, lineno))
        return True

    def trim_continuation(self, line: str) -> tuple[str, bool]:
        """(line without its continuation token, whether the logical line ends here).

        BuildKit's rule is the regex `([^E])E[ \\t]*$|^E[ \\t]*$` replaced by `$1`: the line
        continues when, after trailing blanks, it ends in the escape token E that is not itself
        escaped (`foo\\\\` ends the line). Done here with string operations to the same effect.
        """
        stripped = line.rstrip(" \t")
        esc = self.escape
        if stripped.endswith(esc) and (len(stripped) == 1 or stripped[-2] != esc):
            return stripped[:-1], False
        return line, True

    # main loop ------------------------------------------------------------------------------

    def run(self) -> Dockerfile:
        lines = self.lines
        n = len(lines)
        if len(self.text) * 4 > MAX_LINE_BYTES:
            for idx, raw in enumerate(lines):
                if (
                    len(raw) * 4 > MAX_LINE_BYTES
                    and len(to_go_bytes(raw.rstrip("\n"))) > MAX_LINE_BYTES
                ):
                    raise self.error(
                        f"dockerfile line greater than max allowed size of {MAX_LINE_BYTES}",
                        idx + 1,
                    )
        instructions: list[Instruction] = []
        warnings: list[ParseWarning] = []
        comments: list[str] = []
        i = 0
        current = 0
        while i < n:
            raw = lines[i]
            i += 1
            if current == 0 and raw.startswith("\ufeff"):
                raw = raw[1:]
            # Left-stripping first and then dropping the line end is the same as BuildKit's
            # order (trim the end, then the left), since both strip newlines.
            token = raw.lstrip(GO_SPACE)
            first_col = len(raw) - len(token) + 1
            token = token.rstrip("\r\n")
            is_comment = token[:1] == "#"
            if is_comment:
                comment = go_trim_space(raw[1:])
                if comment == "":
                    comments = []
                else:
                    comments.append(comment)
            if not self.directives_done and self.directive(token, current + 1) and comments:
                comments.pop()
            if is_comment:
                token = ""
            current += 1
            start = current
            token, eol = self.trim_continuation(token)
            if eol and token == "":
                continue
            buf = [token]
            empty_continuation = False
            while not eol and i < n:
                raw = lines[i]
                i += 1
                current += 1
                if _is_comment(raw):
                    continue
                token = raw.rstrip("\r\n")
                if not go_trim_left_space(token):
                    empty_continuation = True
                    continue
                token, eol = self.trim_continuation(token)
                buf.append(token)
            line = "".join(buf)
            if empty_continuation:
                warnings.append(
                    ParseWarning(
                        "Empty continuation line found in: " + line,
                        current,
                        "Empty continuation lines will become errors in a future release",
                        "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/",
                    )
                )
            logical_end = current
            node = self.node_from_line(line, start, current, first_col)
            heredocs: list[Heredoc] = []
            if _can_contain_heredoc(node) and "<<" in line:
                for doc in self.heredocs_from_line(line, start, current, first_col):
                    terminator = doc.name
                    body: list[str] = []
                    terminated = False
                    while i < n:
                        raw = lines[i]
                        i += 1
                        current += 1
                        candidate = raw.rstrip("\r\n")
                        if doc.chomp:
                            candidate = candidate.lstrip("\t")
                        if candidate == terminator:
                            terminated = True
                            break
                        body.append(raw)
                    if not terminated:
                        marker = "<<-" if doc.chomp else "<<"
                        col = self.column_of(marker, start)
                        raise self.error(
                            f"unterminated heredoc: no line {doc.name!r} ends it before the end of the file",
                            start,
                            col,
                            end_line=current,
                            width=len(marker) + len(doc.name),
                        )
                    heredocs.append(Heredoc(doc.name, doc.fd, doc.expand, doc.chomp, "".join(body)))
            instructions.append(
                _freeze(
                    node, start, current, logical_end, first_col, tuple(heredocs), tuple(comments)
                )
            )
            comments = []

        if not instructions:
            raise self.error("file with no instructions", 1)
        return Dockerfile(
            file=self.file,
            instructions=tuple(instructions),
            directives=tuple(self.directives),
            escape=self.escape,
            warnings=tuple(warnings),
            start_line=instructions[0].start_line,
            end_line=instructions[-1].end_line,
            text=self.text,
        )

    # one logical line -----------------------------------------------------------------------

    def node_from_line(self, line: str, start: int, end: int, col: int) -> _Node:
        keyword, flags, rest = _split_command(line)
        rule = _RULES.get(go_lower(keyword))
        is_json = False
        sub = None
        try:
            if rule is None:
                args: tuple[str, ...] = ("",)  # BuildKit keeps unknown instructions, argless
            elif rule == "sub":
                args = ()
                if rest:
                    sub = self.node_from_line(rest, start, end, col)
            else:
                args, is_json = _ARG_RULES[rule](rest, self.escape)
        except _LineError as e:
            needle = e.needle if e.needle is not None else rest[:20]
            where = self.locate(needle, start, end)
            line_no, c = where if where else (start, col)
            width = len(needle) if where else len(keyword)
            raise self.error(e.message, line_no, c, end_line=end, width=width) from None
        return _Node(keyword, tuple(flags), args, is_json, line, sub)

    def heredocs_from_line(self, line: str, start: int, end: int, col: int) -> list[Heredoc]:
        lex = ShellLex("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True)
        try:
            words = lex.process_words(line, {})
        except ShellError:
            return []
        docs = []
        for word in words:
            try:
                doc = parse_heredoc(word)
            except ShellError as e:
                raise self.error(
                    str(e), start, self.column_of(word, start), end_line=end, width=len(word)
                ) from None
            if doc is not None:
                docs.append(doc)
        return docs


def _is_comment(line: str) -> bool:
    stripped = go_trim_left_space(line)
    return stripped[:1] == "#"


def _can_contain_heredoc(node: _Node) -> bool:
    if go_lower(node.keyword) == "onbuild" and node.sub is not None:
        node = node.sub
    return go_lower(node.keyword) in HEREDOC_COMMANDS and not node.json


def _freeze(
    node: _Node,
    start: int,
    end: int,
    logical_end: int,
    col: int,
    heredocs: tuple[Heredoc, ...],
    comments: tuple[str, ...],
) -> Instruction:
    sub = None
    if node.sub is not None:
        sub = _freeze(node.sub, start, end, logical_end, col, (), ())
    return Instruction(
        keyword=node.keyword,
        flags=node.flags,
        args=node.args,
        json=node.json,
        original=node.original,
        start_line=start,
        end_line=end,
        col=col,
        heredocs=heredocs,
        sub=sub,
        comments=comments,
        logical_end_line=logical_end,
    )


# ---------------------------------------------------------------------------------- heredocs


def parse_heredoc(word: str) -> Heredoc | None:
    """A `[fd]<<[-]WORD` shell word as a heredoc marker (content empty), or None.

    The delimiter is lexed twice, with and without quote removal: if the quote counts differ,
    part of it was quoted and the body is not to be expanded. Escaped quotes count the same
    both ways, so `<<eo\\'f` still expands.
    """
    m = _HEREDOC.match(word)
    if not m:
        return None
    fd_text, dash, rest = m.groups()
    fd = min(int(fd_text), 2**64 - 1) if fd_text else 0
    if not rest:
        return None
    plain = ShellLex("\\", skip_unset_env=True).process_words(rest, {})
    if len(plain) != 1:
        return None
    raw = ShellLex("\\", skip_unset_env=True, raw_quotes=True).process_words(rest, {})
    if len(raw) != len(plain):
        raise ShellError(f"internal lexing of heredoc produced inconsistent results: {rest}")
    name = plain[0]
    expand = (name.count("'") + name.count('"')) == (raw[0].count("'") + raw[0].count('"'))
    return Heredoc(name=name, fd=fd, expand=expand, chomp=dash == "-", content="")


# ------------------------------------------------------------------------- splitting a line


class _LineError(Exception):
    def __init__(self, message: str, needle: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.needle = needle


def _split_command(line: str) -> tuple[str, list[str], str]:
    """(keyword as written, flags, rest). The keyword is the first field of the trimmed line."""
    parts = _WS.split(go_trim_space(line), maxsplit=1)
    keyword = parts[0]
    flags: list[str] = []
    rest = ""
    if len(parts) == 2:
        rest, flags = _extract_flags(parts[1])
    return keyword, flags, go_trim_space(rest)


def _extract_flags(line: str) -> tuple[str, list[str]]:
    """BuildKit's extractBuilderFlags: leading `--words` become flags, with quotes removed and
    `\\x` giving `x`. The scan is byte-wise (as upstream), so a non-ASCII byte in a flag reads
    as the Latin-1 character of that byte and bytes 0x85/0xA0 count as blanks."""
    # Fast path: the first non-blank byte does not start `--`. (A non-ASCII character never
    # starts with a blank byte, so only ASCII blanks and undecodable bytes are skipped.)
    lead = line.lstrip(" \t\n\v\f\r")
    if not lead.startswith("--") and lead[:1] not in ("\udc85", "\udca0"):
        return lead, []
    if line.isascii():
        data = line
        as_str = True
    else:
        data = to_go_bytes(line)  # type: ignore[assignment]
        as_str = False

    def char(pos: int) -> str:
        return data[pos] if as_str else chr(data[pos])  # type: ignore[index]

    def rest_from(pos: int) -> str:
        return data[pos:] if as_str else from_go_bytes(data[pos:])  # type: ignore[return-value]

    def space(ch: str) -> bool:
        return ord(ch) in GO_SPACE_BYTES

    words: list[str] = []
    n = len(data)
    phase = 0  # 0 between words, 1 in a word, 2 in quotes
    word: list[str] = []
    quote = ""
    blank_ok = False
    pos = 0
    while True:
        if pos == n:
            if phase != 0:
                w = "".join(word)
                if w != "--" and (blank_ok or w):
                    words.append(w)
            return "", words
        ch = char(pos)
        if phase == 0:
            if space(ch):
                pos += 1
                continue
            if ch != "-" or pos + 1 == n or char(pos + 1) != "-":
                return rest_from(pos), words
            phase = 1
        if phase == 1:
            if space(ch):
                phase = 0
                w = "".join(word)
                if w == "--":
                    return rest_from(pos), words
                if blank_ok or w:
                    words.append(w)
                word = []
                blank_ok = False
                pos += 1
                continue
            if ch == "'" or ch == '"':
                quote = ch
                blank_ok = True
                phase = 2
                pos += 1
                continue
            if ch == "\\":
                if pos + 1 == n:
                    pos += 1
                    continue
                pos += 1
                ch = char(pos)
            word.append(ch)
            pos += 1
            continue
        # in quotes
        if ch == quote:
            phase = 1
            pos += 1
            continue
        if ch == "\\":
            if pos + 1 == n:
                phase = 1
                pos += 1
                continue
            pos += 1
            ch = char(pos)
        word.append(ch)
        pos += 1


def _fields(rest: str) -> list[str]:
    return _WS.split(rest) if rest else []


def _parse_words(rest: str, escape: str) -> list[str]:
    """BuildKit's parseWords: split on blanks outside quotes, keeping quotes and escapes."""
    rest = replace_invalid(rest)
    if "'" not in rest and '"' not in rest and escape not in rest:
        return [w for w in _GO_SPACE_RUN.split(rest) if w]  # no quoting: plain fields
    words: list[str] = []
    word: list[str] = []
    phase = 0
    quote = ""
    blank_ok = False
    n = len(rest)
    i = 0
    while True:
        if i == n:
            if phase != 0 and (blank_ok or word):
                words.append("".join(word))
            return words
        ch = rest[i]
        if phase == 0:
            if is_go_space(ch):
                i += 1
                continue
            phase = 1
        if phase == 1:
            if is_go_space(ch):
                phase = 0
                if blank_ok or word:
                    words.append("".join(word))
                word = []
                blank_ok = False
                i += 1
                continue
            if ch == "'" or ch == '"':
                quote = ch
                blank_ok = True
                phase = 2
            if ch == escape:
                if i + 1 == n:
                    i += 1
                    continue
                word.append(ch)
                i += 1
                ch = rest[i]
            word.append(ch)
            i += 1
            continue
        if ch == quote:
            phase = 1
        if ch == escape and quote != "'":
            if i + 1 == n:
                phase = 1
                i += 1
                continue
            word.append(ch)
            i += 1
            ch = rest[i]
        word.append(ch)
        i += 1


class _NotJSON(Exception):
    pass


def _go_number(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJSON(text)  # Go cannot hold it in a float64: the decode fails
    return value


def _reject_constant(text: str) -> None:
    raise _NotJSON(text)


_NOT_STRINGS = "when using JSON array syntax, arrays must be comprised of strings only"


def _parse_json(rest: str) -> list[str] | None:
    """The JSON rule: a strict JSON array of strings, None when `rest` is not one. A valid
    array holding anything but strings is an error, not a fallback."""
    body = go_trim_left_space(rest)
    if not body.startswith("["):
        return None
    try:
        value = json.loads(
            body, parse_int=_go_number, parse_float=_go_number, parse_constant=_reject_constant
        )
    except (ValueError, _NotJSON):
        return None
    except RecursionError:
        raise _LineError(_NOT_STRINGS, "[") from None
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if not isinstance(item, str):
            raise _LineError(_NOT_STRINGS, "[")
        # Go decodes invalid UTF-8 and unpaired surrogate escapes as U+FFFD.
        out.append(replace_invalid(item))
    return out


def _rule_maybe_json(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    if rest == "":
        return (), False
    cells = _parse_json(rest)
    if cells is not None:
        return tuple(cells), True
    return (rest,), False


def _rule_json_or_list(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    cells = _parse_json(rest)
    if cells is not None:
        return tuple(cells), True
    return tuple(_fields(rest)), False


def _rule_fields(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    return tuple(_fields(rest)), False


def _rule_string(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    return ((rest,) if rest else ()), False


def _rule_health(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    # The type word ends at the first blank byte (byte-wise, as upstream).
    data = to_go_bytes(rest)
    sep = 0
    while sep < len(data) and data[sep] not in GO_SPACE_BYTES:
        sep += 1
    nxt = sep
    while nxt < len(data) and data[nxt] in GO_SPACE_BYTES:
        nxt += 1
    if sep == 0:
        return (), False
    cmd, is_json = _rule_maybe_json(from_go_bytes(data[nxt:]), escape)
    return (from_go_bytes(data[:sep]), *cmd), is_json


def _name_val(rest: str, escape: str, key: str) -> tuple[tuple[str, ...], bool]:
    words = _parse_words(rest, escape)
    if not words:
        return (), False
    if "=" not in words[0]:
        parts = _WS.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise _LineError(f"{key} must have two arguments", None)
        return (parts[0], parts[1], ""), False
    cells: list[str] = []
    for word in words:
        if "=" not in word:
            raise _LineError(
                f"Syntax error - can't find = in {go_quote(word)}. Must be of the form: name=value",
                word,
            )
        k, _, v = word.partition("=")
        cells += (k, v, "=")
    return tuple(cells), False


def _rule_env(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    return _name_val(rest, escape, "ENV")


def _rule_label(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    return _name_val(rest, escape, "LABEL")


def _rule_name_or_name_val(rest: str, escape: str) -> tuple[tuple[str, ...], bool]:
    return tuple(_parse_words(rest, escape)), False


_ARG_RULES = {
    "maybe_json": _rule_maybe_json,
    "json_or_list": _rule_json_or_list,
    "fields": _rule_fields,
    "string": _rule_string,
    "health": _rule_health,
    "env": _rule_env,
    "label": _rule_label,
    "name_or_name_val": _rule_name_or_name_val,
}
