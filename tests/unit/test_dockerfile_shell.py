"""BuildKit's shell-word lexer: expansion, quotes, escapes, word splitting, modes.

The upstream tables run in tests/conformance; these pin behaviour they do not cover.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlimage.errors import TlimageError
from tlimage.frontends.dockerfile.shell import (
    ShellError,
    ShellLex,
    process_word,
    process_word_with_matches,
    process_words,
)

ENV = {"A": "a", "SP": "x  y", "EMPTY": "", "PATH": "/usr/bin", "F": "/tmp/foo.tar.gz"}


@pytest.mark.parametrize(
    "word, expected",
    [
        ("$A", "a"),
        ("${A}b", "ab"),
        ("$Ab", ""),  # the name runs on: $Ab is unset
        ("${MISSING:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${F#*/}", "tmp/foo.tar.gz"),
        ("${F##*/}", "foo.tar.gz"),
        ("${F%.*}", "/tmp/foo.tar"),
        ("${F%%.*}", "/tmp/foo"),
        ("${F/o/0}", "/tmp/f0o.tar.gz"),
        ("${F//o/0}", "/tmp/f00.tar.gz"),
        ("${PATH}:/opt", "/usr/bin:/opt"),
        ("'$A'", "$A"),
        ('"$A"', "a"),
        ('"\\$A"', "$A"),
        ('"a\\b"', "a\\b"),  # inside double quotes only \" \$ \\ are escapes
        ("a\\ b", "a b"),
        ("\\", ""),
        ("$", "$"),
        ("$1", ""),
        ("$#", ""),
        ("\ufeff$A", "a"),  # a byte-order mark at the start is skipped, as Go's scanner does
    ],
)
def test_process_word(word: str, expected: str) -> None:
    assert process_word(word, ENV) == expected


def test_backtick_escape() -> None:
    assert process_word("a` b`$A", ENV, escape="`") == "a b$A"
    assert process_word('"``"', ENV, escape="`") == "`"


@pytest.mark.parametrize(
    "word, words",
    [
        ("$SP", ["x", "y"]),
        ('"$SP"', ["x  y"]),
        ("a$SP", ["ax", "y"]),
        ("a\\ b c", ["a b", "c"]),
        ('a "" b', ["a", "b"]),  # an empty quoted word is not a word
        ("  ", []),
        ("cat <<  EOF > f", ["cat", "<<  EOF", ">", "f"]),
    ],
)
def test_process_words(word: str, words: list[str]) -> None:
    assert process_words(word, ENV) == words


def test_nested_expansion_keeps_the_surrounding_word() -> None:
    # BuildKit's lexer would drop the leading "a" here; see the module docstring.
    assert process_words("a${MISSING:-b}c", ENV) == ["abc"]


@pytest.mark.parametrize(
    "word, message",
    [
        ("${MISSING:?must be set}", "MISSING: must be set"),
        ("${EMPTY:?}", "EMPTY: is not allowed to be empty"),
        ("${MISSING?}", "MISSING: is not allowed to be unset"),
        ("${A", "unsupported modifier (\ufffd) in substitution"),
        ("${A:", "syntax error: missing '}'"),
        ("${}", "syntax error: bad substitution"),
        ("${A=b}", "unsupported modifier (=) in substitution"),
        ("${A:#b}", "unsupported modifier (:#) in substitution"),
        ("${A/b}", "syntax error: missing '/' in ${}"),
        ("'abc", "unexpected end of statement while looking for matching single-quote"),
        ('"abc', "unexpected end of statement while looking for matching double-quote"),
        ("${A#\\x}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
    ],
)
def test_errors(word: str, message: str) -> None:
    with pytest.raises(ShellError) as info:
        process_word(word, ENV)
    err = info.value
    assert isinstance(err, TlimageError)
    assert message in str(err)
    assert str(err).startswith("failed to process ")


def test_matches() -> None:
    r = process_word_with_matches("$A ${MISSING:-$EMPTY} ${F%%.*}", ENV)
    assert r.result == "a  /tmp/foo"
    assert r.matched == {"A", "EMPTY", "F"}
    assert r.unmatched == {"MISSING"}


def test_env_as_list_of_assignments() -> None:
    assert process_word("$A-$B", ["A=1", "B=x=y"]) == "1-x=y"


def test_raw_modes_used_for_heredoc_detection() -> None:
    lex = ShellLex(raw_quotes=True, raw_escapes=True, skip_unset_env=True)
    assert lex.process_words("RUN <<'E O' \\x $U ${U:-d}", {}) == [
        "RUN",
        "<<'E O'",
        "\\x",
        "$U",
        "${U:-d}",
    ]
    assert ShellLex(skip_process_quotes=True).process_word("'$A' \"$A\"", ENV) == "'a' \"a\""


def test_replace_all_follows_go_regexp() -> None:
    # Go's ReplaceAll skips an empty match right after a match; `$0` is the match.
    assert process_word("${V//*/-}", {"V": "ab"}) == "-"
    assert process_word("${V//?/<$0>}", {"V": "ab", "0": "unused"}) == "<unused><unused>"
    assert process_word("${V//?/<\\$0>}", {"V": "ab"}) == "<\\a><\\b>"
    assert process_word("${V/$E/x}", {"V": "ab", "E": ""}) == "xab"
    assert process_word("${V//$E/x}", {"V": "ab", "E": ""}) == "xaxbx"


def test_bad_escape_token() -> None:
    with pytest.raises(ValueError):
        process_word("a", {}, escape="|")


_PIECES = st.sampled_from(
    [
        "a",
        " ",
        "$",
        "{",
        "}",
        ":",
        "-",
        "+",
        "?",
        "#",
        "%",
        "/",
        "'",
        '"',
        "\\",
        "A",
        "SP",
        "*",
        "<",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=25).map("".join))
def test_lexer_never_fails_unexpectedly(word: str) -> None:
    for lex in (ShellLex(), ShellLex(raw_quotes=True, raw_escapes=True, skip_unset_env=True)):
        try:
            result = lex.process(word, ENV)
        except ShellError:
            continue
        # Word splitting never yields an empty word.
        assert all(result.words)
