"""BuildKit's shell-word lexer: variable expansion, quote removal and word splitting.

This is what a Dockerfile instruction's words go through before they are used (`COPY $SRC /d`,
`ENV PATH=$PATH:/x`, `FROM base:${TAG:-latest}`). It mimics a POSIX shell closely enough for
Dockerfiles and no further; it never runs anything.

Supported: `$VAR`, `${VAR}`, `${VAR:-word}` `${VAR-word}` (default), `${VAR:+word}`
`${VAR+word}` (alternative), `${VAR:?msg}` `${VAR?msg}` (required), `${VAR#pat}` `${VAR##pat}`
(strip prefix, shortest/longest), `${VAR%pat}` `${VAR%%pat}` (strip suffix), `${VAR/pat/repl}`
`${VAR//pat/repl}` (replace first/all). Patterns know `*`, `?` and escapes, not `[...]`.
Single quotes take everything literally; in double quotes the escape token only escapes `"`,
`$` and itself. The escape token is `\\` or, under `# escape=` + a backtick.

`process_word` expands and removes quotes but keeps spaces (one word in, one word out);
`process_words` also splits on unquoted whitespace, after expansion, so a variable holding
`a b` yields two words unless quoted.

Deliberate difference from BuildKit: BuildKit's lexer shares one word buffer between a
`${...}` and the word around it, so `process_words("a${X:-b}c")` there drops the `a`. Here each
level keeps its own buffer (`["abc"]`). `process_word`, which is what instructions use, is
unaffected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tlimage.errors import DockerfileError
from tlimage.frontends.dockerfile._gostr import go_quote, is_go_space, replace_invalid

__all__ = [
    "ShellError",
    "ShellLex",
    "WordResult",
    "process_word",
    "process_word_with_matches",
    "process_words",
]

_SPECIAL_PARAMS = frozenset("@*#?-$!0")
_REGEX_META = frozenset("[]{}.+()|^$")
_HEREDOC_SPACE = frozenset("\t\r ")


class ShellError(DockerfileError):
    """A word could not be expanded (`${X:?unset}`, an unterminated quote, a bad modifier).

    The lexer does not know where the word came from; callers that do re-raise it with a span.
    """

    def __init__(self, message: str, span=None, *, text=None, hint=None) -> None:
        super().__init__(message, span, text=text, hint=hint)


class _Fail(Exception):
    """Internal: an expansion error before it is wrapped with the word that failed."""


@dataclass(frozen=True, slots=True)
class WordResult:
    """The expansion of one word: the text, its split words, and which variables it used.

    `matched` are referenced names that were set (even to ""), `unmatched` those that were not.
    """

    result: str
    words: tuple[str, ...]
    matched: frozenset[str]
    unmatched: frozenset[str]


def _env_map(env: Mapping[str, str] | Iterable[str] | None) -> Mapping[str, str]:
    if env is None:
        return {}
    if isinstance(env, Mapping):
        return env
    out: dict[str, str] = {}
    for item in env:
        key, _, value = item.partition("=")
        out[key] = value
    return out


class ShellLex:
    """A configured lexer. The flags mirror BuildKit's and exist for the parser's own use:

    - `raw_quotes`: keep quote characters in the result.
    - `raw_escapes`: keep escape tokens in the result.
    - `skip_unset_env`: leave references to unset variables as written (`$X`, `${X:-d}`).
    - `skip_process_quotes`: treat quotes as ordinary characters (heredoc bodies).
    """

    __slots__ = ("escape", "raw_quotes", "raw_escapes", "skip_unset_env", "skip_process_quotes")

    def __init__(
        self,
        escape: str = "\\",
        *,
        raw_quotes: bool = False,
        raw_escapes: bool = False,
        skip_unset_env: bool = False,
        skip_process_quotes: bool = False,
    ) -> None:
        if escape not in ("\\", "`"):
            raise ValueError(f"escape token must be '\\' or '`', not {escape!r}")
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.skip_unset_env = skip_unset_env
        self.skip_process_quotes = skip_process_quotes

    def process(self, word: str, env: Mapping[str, str] | Iterable[str] | None) -> WordResult:
        state = _Word(self, word, _env_map(env))
        try:
            result, words = state.stop_on(None, self.raw_escapes)
        except _Fail as e:
            raise ShellError(f"failed to process {go_quote(word)}: {e}") from None
        return WordResult(
            result, tuple(words), frozenset(state.matched), frozenset(state.unmatched)
        )

    def process_word(self, word: str, env: Mapping[str, str] | Iterable[str] | None) -> str:
        return self.process(word, env).result

    def process_words(self, word: str, env: Mapping[str, str] | Iterable[str] | None) -> list[str]:
        return list(self.process(word, env).words)


_DEFAULT = {"\\": ShellLex("\\"), "`": ShellLex("`")}


def process_word(
    word: str, env: Mapping[str, str] | Iterable[str] | None = None, escape: str = "\\"
) -> str:
    """Expand variables and remove quotes; whitespace is kept. Raises `ShellError`."""
    return _lexer(escape).process(word, env).result


def process_words(
    word: str, env: Mapping[str, str] | Iterable[str] | None = None, escape: str = "\\"
) -> list[str]:
    """Expand, then split on unquoted whitespace. Raises `ShellError`."""
    return list(_lexer(escape).process(word, env).words)


def process_word_with_matches(
    word: str, env: Mapping[str, str] | Iterable[str] | None = None, escape: str = "\\"
) -> WordResult:
    """Like `process_word`, also reporting which variables were set and which were not."""
    return _lexer(escape).process(word, env)


def _lexer(escape: str) -> ShellLex:
    try:
        return _DEFAULT[escape]
    except KeyError:
        raise ValueError(f"escape token must be '\\' or '`', not {escape!r}") from None


class _Words:
    """Word splitting as BuildKit's `wordsStruct` does it: a quoted empty string marks a word
    as started but, being empty, never becomes one."""

    __slots__ = ("buf", "words", "in_word")

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.words: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if is_go_space(ch):
            if self.in_word and self.buf:
                self.words.append("".join(self.buf))
                self.buf.clear()
                self.in_word = False
        else:
            self.buf.append(ch)
            self.in_word = True

    def add_raw_char(self, ch: str) -> None:
        self.buf.append(ch)
        self.in_word = True

    def add_string(self, s: str) -> None:
        for ch in s:
            self.add_char(ch)

    def add_raw_string(self, s: str) -> None:
        if s:
            self.buf.append(s)
        self.in_word = True

    def get(self) -> list[str]:
        if self.buf:
            self.words.append("".join(self.buf))
            self.buf.clear()
            self.in_word = False
        return self.words


class _Word:
    """One expansion in progress: the scanner position, the lookup table and what it used."""

    __slots__ = ("lex", "src", "pos", "n", "env", "raw_escapes", "matched", "unmatched")

    def __init__(self, lex: ShellLex, src: str, env: Mapping[str, str]) -> None:
        # Go's text/scanner reads runes: undecodable bytes read as U+FFFD and a byte-order
        # mark at the very start is skipped.
        src = replace_invalid(src)
        self.lex = lex
        self.src = src
        self.pos = 1 if src.startswith("\ufeff") else 0
        self.n = len(src)
        self.env = env
        self.raw_escapes = lex.raw_escapes
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def peek(self) -> str | None:
        return self.src[self.pos] if self.pos < self.n else None

    def next(self) -> str | None:
        if self.pos < self.n:
            ch = self.src[self.pos]
            self.pos += 1
            return ch
        return None

    def get_env(self, name: str) -> tuple[str, bool]:
        value = self.env.get(name)
        if value is None:
            self.unmatched.add(name)
            return "", False
        self.matched.add(name)
        return value, True

    def stop_on(self, stop: str | None, raw_escapes: bool) -> tuple[str, list[str]]:
        """Process up to `stop` (consumed) or the end; `raw_escapes` holds for this level."""
        saved = self.raw_escapes
        self.raw_escapes = raw_escapes
        try:
            return self._stop_on(stop)
        finally:
            self.raw_escapes = saved

    def _stop_on(self, stop: str | None) -> tuple[str, list[str]]:
        result: list[str] = []
        words = _Words()
        escape = self.lex.escape
        quotes = not self.lex.skip_process_quotes
        src = self.src
        while self.pos < self.n:
            ch = src[self.pos]
            if ch == stop:
                self.pos += 1
                return "".join(result), words.get()
            if ch == "$":
                tmp = self.dollar()
                result.append(tmp)
                words.add_string(tmp)
                continue
            if ch == "<":
                tmp = self.possible_heredoc()
                result.append(tmp)
                words.add_raw_string(tmp)
                continue
            if quotes and ch == "'":
                tmp = self.single_quote()
                result.append(tmp)
                words.add_raw_string(tmp)
                continue
            if quotes and ch == '"':
                tmp = self.double_quote()
                result.append(tmp)
                words.add_raw_string(tmp)
                continue
            self.pos += 1
            if ch == escape:
                if self.raw_escapes:
                    words.add_raw_char(ch)
                    result.append(ch)
                if self.pos >= self.n:
                    break  # an escape token at the very end is dropped
                ch = src[self.pos]
                self.pos += 1
                words.add_raw_char(ch)
            else:
                words.add_char(ch)
            result.append(ch)
        if stop is not None:
            raise _Fail(f"unexpected end of statement while looking for matching {stop}")
        return "".join(result), words.get()

    def single_quote(self) -> str:
        raw = self.lex.raw_quotes
        result = []
        ch = self.next()
        if raw:
            result.append(ch)
        while True:
            ch = self.next()
            if ch is None:
                raise _Fail("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if raw:
                    result.append(ch)
                return "".join(result)
            result.append(ch)

    def double_quote(self) -> str:
        raw = self.lex.raw_quotes
        escape = self.lex.escape
        result = []
        ch = self.next()
        if raw:
            result.append(ch)
        while True:
            p = self.peek()
            if p is None:
                raise _Fail("unexpected end of statement while looking for matching double-quote")
            if p == '"':
                self.pos += 1
                if raw:
                    result.append(p)
                return "".join(result)
            if p == "$":
                result.append(self.dollar())
                continue
            ch = self.next()
            if ch == escape:
                if self.raw_escapes:
                    result.append(ch)
                nxt = self.peek()
                if nxt is None:
                    continue  # the next round reports the missing quote
                if nxt == '"' or nxt == "$" or nxt == escape:
                    ch = self.next()
            result.append(ch)  # type: ignore[arg-type]

    def possible_heredoc(self) -> str:
        # `<<` keeps the blanks after it, so `<<  EOF` stays one word for heredoc detection.
        self.pos += 1
        if self.peek() != "<":
            return "<"
        self.pos += 1
        start = self.pos
        while self.pos < self.n and self.src[self.pos] in _HEREDOC_SPACE:
            self.pos += 1
        return "<<" + self.src[start : self.pos]

    def name(self) -> str:
        src = self.src
        start = self.pos
        if start < self.n:
            ch = src[start]
            if ch.isdecimal():
                while self.pos < self.n and src[self.pos].isdecimal():
                    self.pos += 1
                return src[start : self.pos]
            if ch in _SPECIAL_PARAMS:
                self.pos += 1
                return ch
        while self.pos < self.n:
            ch = src[self.pos]
            if not (ch.isalpha() or ch.isdecimal() or ch == "_"):
                break
            self.pos += 1
        return src[start : self.pos]

    def dollar(self) -> str:
        self.pos += 1  # the '$'
        skip_unset = self.lex.skip_unset_env
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            value, found = self.get_env(name)
            if not found and skip_unset:
                return "$" + name
            return value

        self.pos += 1  # the '{'
        p = self.peek()
        if p is None:
            raise _Fail("syntax error: missing '}'")
        if p in "{}:":
            raise _Fail("syntax error: bad substitution")
        name = self.name()
        ch = self.next()
        chs = "\ufffd" if ch is None else ch  # Go formats the EOF rune as U+FFFD
        null_is_unset = False

        if ch == "}":
            value, found = self.get_env(name)
            if not found and skip_unset:
                return "${" + name + "}"
            return value

        if ch == ":":
            null_is_unset = True
            ch = self.next()
            chs += "\ufffd" if ch is None else ch
            return self._modifier(name, ch, chs, null_is_unset)
        if ch is not None and ch in "+-?#%":
            return self._modifier(name, ch, chs, null_is_unset)
        if ch == "/":
            return self._replace(name)
        raise _Fail(f"unsupported modifier ({chs}) in substitution")

    def _modifier(self, name: str, ch: str | None, chs: str, null_is_unset: bool) -> str:
        # `${X:<anything>}` gets here whatever follows the colon; an unknown modifier is only
        # reported after its word has been read (and the variable looked up), as BuildKit does.
        raw_escapes = ch == "#" or ch == "%"
        if null_is_unset and raw_escapes:
            raise _Fail(f"unsupported modifier ({chs}) in substitution")
        word = self._sub_word("}", raw_escapes, "syntax error: missing '}'")
        value, found = self.get_env(name)
        if self.lex.skip_unset_env and not found:
            return "${" + name + chs + word + "}"
        if ch == "-":
            if not found or (null_is_unset and value == ""):
                return word
            return value
        if ch == "+":
            if not found or (null_is_unset and value == ""):
                return ""
            return word
        if ch == "?":
            if not found:
                raise _Fail(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _Fail(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch == "%" or ch == "#":
            greedy = False
            if word and word[0] == ch:
                greedy = True
                word = word[1:]
            if ch == "%":
                return _trim_suffix(word, value, greedy)
            return _trim_prefix(word, value, greedy)
        raise _Fail(f"unsupported modifier ({chs}) in substitution")

    def _sub_word(self, stop: str, raw_escapes: bool, at_eof: str) -> str:
        try:
            word, _ = self.stop_on(stop, raw_escapes)
        except _Fail:
            if self.pos >= self.n:
                raise _Fail(at_eof) from None
            raise
        return word

    def _replace(self, name: str) -> str:
        replace_all = self.peek() == "/"
        if replace_all:
            self.pos += 1
        pattern = self._sub_word("/", True, "syntax error: missing '/' in ${}")
        replacement = self._sub_word("}", True, "syntax error: missing '}'")
        value, found = self.get_env(name)
        if self.lex.skip_unset_env and not found:
            return "${" + name + "/" + pattern + "/" + replacement + "}"
        regex = _pattern_regex(pattern, True, False)
        if replace_all:
            return _go_replace_all(regex, value, replacement)
        m = regex.search(value)
        if m:
            value = value[: m.start()] + replacement + value[m.end() :]
        return value


def _pattern_regex(pattern: str, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A shell pattern as a regular expression: `*` any run (shortest unless `greedy`), `?`
    one character, `\\*` `\\?` `\\\\` literal; `\\}` and `\\/` are the closing characters of
    `${...}` written inside it."""
    try:
        return _pattern_cache[(pattern, greedy, anchored)]
    except KeyError:
        pass
    out = ["^"] if anchored else []
    star = ".*" if greedy else ".*?"
    i = 1 if pattern.startswith("\ufeff") else 0
    n = len(pattern)
    while i < n:
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.append(star)
            continue
        if tok == "?":
            out.append(".")
            continue
        if tok == "\\":
            nxt = pattern[i] if i < n else None
            if nxt == "}" or nxt == "/":
                continue
            out.append("\\")
            i += 1
            if nxt not in ("*", "?", "\\"):
                bad = "\ufffd" if nxt is None else nxt
                raise _Fail(
                    f"invalid pattern ({pattern}) in substitution: invalid escape '\\{bad}'"
                )
            out.append(nxt)  # type: ignore[arg-type]
            continue
        if tok in _REGEX_META:
            out.append("\\")
        out.append(tok)
    regex = re.compile("".join(out))
    if len(_pattern_cache) > 512:
        _pattern_cache.clear()
    _pattern_cache[(pattern, greedy, anchored)] = regex
    return regex


_pattern_cache: dict[tuple[str, bool, bool], re.Pattern[str]] = {}


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    m = _pattern_regex(pattern, greedy, True).search(value)
    return value[m.end() :] if m else value


def _reverse_pattern(pattern: str) -> str:
    """Reverse a pattern but keep each escape pair in order (`a\\*c` -> `c\\*a`)."""
    chars = list(pattern)
    last = len(chars) - 1
    out = [""] * len(chars)
    i = 0
    while i <= last:
        tok = chars[i]
        j = last - i
        if tok == "\\" and i != last:
            out[j - 1] = tok
            out[j] = chars[i + 1]
            i += 2
        else:
            out[j] = tok
            i += 1
    return "".join(out)


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # A regex finds the leftmost match, not the shortest rightmost one: reverse both sides.
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]


def _go_replace_all(regex: re.Pattern[str], src: str, template: str) -> str:
    """regexp.ReplaceAllString: an empty match right after a match is skipped, and `$0` /
    `${0}` in the replacement stand for the match (the pattern has no other groups)."""
    out: list[str] = []
    last_end = 0
    search = 0
    n = len(src)
    while search <= n:
        m = regex.search(src, search)
        if m is None:
            break
        a0, a1 = m.span()
        out.append(src[last_end:a0])
        if a1 > last_end or a0 == 0:
            out.append(_go_expand(template, m.group(0)))
        last_end = a1
        if search + 1 > a1:
            search += 1
        else:
            search = a1
    out.append(src[last_end:])
    return "".join(out)


_TEMPLATE_NAME = re.compile(r"\{([^\W]+)\}|([^\W]+)")


def _go_expand(template: str, match: str) -> str:
    """regexp.Expand for a match with only group 0."""
    if "$" not in template:
        return template
    out: list[str] = []
    rest = template
    while True:
        before, dollar, after = rest.partition("$")
        if not dollar:
            out.append(rest)
            break
        out.append(before)
        if after.startswith("$"):
            out.append("$")
            rest = after[1:]
            continue
        m = _TEMPLATE_NAME.match(after)
        if not m:
            out.append("$")  # malformed: the '$' is literal
            rest = after
            continue
        name = m.group(1) or m.group(2)
        rest = after[m.end() :]
        if name.isascii() and name.isdigit() and not (name[0] == "0" and len(name) > 1):
            if int(name) == 0:
                out.append(match)
        # a named group never exists here; it expands to nothing
    return "".join(out)
