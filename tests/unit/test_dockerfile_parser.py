"""The Dockerfile parser (stage one): BuildKit's line handling, argument cells and dump format.

The corpus cases live in tests/conformance; these pin the rules one by one, including the
quirks the corpus does not reach.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlimage.errors import DockerfileError, TlimageError
from tlimage.frontends.dockerfile import DockerfileParseError, dump, parse
from tlimage.frontends.dockerfile._gostr import go_lower, go_quote
from tlimage.frontends.dockerfile.parser import dump_instruction, parse_heredoc


def d(text: str | bytes) -> str:
    return dump(parse(text, "Dockerfile"))


def one(text: str):
    ast = parse(text, "Dockerfile")
    assert len(ast.instructions) == 1
    return ast.instructions[0]


# ------------------------------------------------------------------------------- dump format


@pytest.mark.parametrize(
    "src, expected",
    [
        ("FROM alpine AS build", '(from "alpine" "AS" "build")'),
        ("RUN echo hi", '(run "echo hi")'),
        ('RUN ["echo", "hi"]', '(run "echo" "hi")'),
        ("CMD []", "(cmd)"),
        ('CMD [""]', '(cmd "")'),
        ("ENTRYPOINT []", "(entrypoint)"),
        ("EXPOSE", "(expose)"),
        ("ENV GOPATH \\go", '(env "GOPATH" "\\\\go" "")'),
        ('ENV SCUBA "1 DUBA 3"', '(env "SCUBA" "\\"1 DUBA 3\\"" "")'),
        ('LABEL "a b"=c d=', '(label "\\"a b\\"" "c" "=" "d" "" "=")'),
        ('ARG abc="123 456" def', '(arg "abc=\\"123 456\\"" "def")'),
        ("add a\\ b c", '(add "a\\\\" "b" "c")'),
        ("COPY --from=build --chmod=755 a b", '(copy ["--from=build" "--chmod=755"] "a" "b")'),
        ("COPY --doit=true -- foo /tmp/", '(copy ["--doit=true"] "foo" "/tmp/")'),
        ('CMD --doit [ "a", "b" ]', '(cmd ["--doit"] "a" "b")'),
        ('COPY --from="x y" a b', '(copy ["--from=x y"] "a" "b")'),
        ("COPY --chmod=7\\55 a b", '(copy ["--chmod=755"] "a" "b")'),
        ("HEALTHCHECK CONNECT TCP 7000", '(healthcheck "CONNECT" "TCP 7000")'),
        ('HEALTHCHECK --timeout=3s CMD ["foo"]', '(healthcheck ["--timeout=3s"] "CMD" "foo")'),
        ("HEALTHCHECK", "(healthcheck)"),
        ("ONBUILD RUN echo test", '(onbuild (run "echo test"))'),
        (
            "ONBUILD --x=1 RUN --mount=a echo hi",
            '(onbuild ["--x=1"] (run ["--mount=a"] "echo hi"))',
        ),
        ("ONBUILD", "(onbuild)"),
        ("FOO bar baz", '(foo "")'),
        ("WORKDIR /a b", '(workdir "/a b")'),
        ("STOPSIGNAL", "(stopsignal)"),
        ('CMD ["a", "\\u0000"]', '(cmd "a" "\\x00")'),
        ("Run echo", '(run "echo")'),
    ],
)
def test_dump(src: str, expected: str) -> None:
    assert d(src) == expected


def test_keyword_case_is_kept_and_lowered_only_in_dump() -> None:
    ins = one("rUn echo")
    assert ins.keyword == "rUn"
    assert ins.command == "run"
    # Go's strings.ToLower maps rune by rune: the dotted capital I becomes a plain i.
    assert go_lower("WORKDİR") == "workdir"
    assert one("WORKDİR /x").command == "workdir"


def test_dump_is_one_line_per_instruction_without_final_newline() -> None:
    assert d("FROM a\nRUN b\n") == '(from "a")\n(run "b")'


# ------------------------------------------------------------------------------- JSON rule


@pytest.mark.parametrize(
    "src",
    [
        'CMD [ "a", 1 ]x',  # trailing garbage: not JSON, so shell form
        "CMD [NaN]",
        "CMD [1e400]",  # does not fit a float64: the decode fails in Go
        "CMD ['single']",
        'CMD ["unterminated',
    ],
)
def test_json_rule_falls_back_to_shell_form(src: str) -> None:
    ins = one(src)
    assert not ins.json
    assert ins.args == (src[4:],)


@pytest.mark.parametrize("src", ['CMD ["a", 1]', "CMD [true]", "CMD [null]", 'RUN ["a", ["b"]]'])
def test_json_array_of_non_strings_is_an_error(src: str) -> None:
    with pytest.raises(DockerfileParseError, match="arrays must be comprised of strings only"):
        parse(src)


def test_json_form_marks_instruction_and_decodes() -> None:
    ins = one('RUN ["echo", "a\\tb", "\\ud83d\\ude00", "\\ud800"]')
    assert ins.json
    assert ins.args == ("echo", "a\tb", "😀", "\ufffd")


def test_copy_json_and_list_forms() -> None:
    assert one('COPY ["a b", "c"]').args == ("a b", "c")
    assert one("COPY  a   b\tc").args == ("a", "b", "c")


# ----------------------------------------------------------------------------- line handling


def test_continuation_joins_without_separator_and_keeps_indentation() -> None:
    ins = one("RUN echo a && \\\n    echo b\n")
    assert ins.args == ("echo a &&     echo b",)
    assert (ins.start_line, ins.end_line) == (1, 2)


def test_escaped_escape_does_not_continue() -> None:
    ast = parse("RUN echo foo\\\\\nRUN x\n")
    assert [i.args for i in ast] == [("echo foo\\\\",), ("x",)]


def test_continuation_skips_comments_and_warns_on_blank_lines() -> None:
    ast = parse("RUN a \\\n# comment \\\n\n  b\n")
    assert ast.instructions[0].args == ("a   b",)
    assert [w.short for w in ast.warnings] == ["Empty continuation line found in: RUN a   b"]
    assert ast.warnings[0].line == 4


def test_continuation_at_end_of_file() -> None:
    assert d("RUN a \\") == '(run "a")'
    assert d("RUN a \\\n") == '(run "a")'


def test_lone_escape_line_starts_an_instruction() -> None:
    assert d("\\\nRUN x") == '(run "x")'


def test_backtick_escape_directive() -> None:
    ast = parse("# escape=`\nRUN dir c:\\ `\n  && echo\n")
    assert ast.escape == "`"
    assert ast.instructions[0].args == ("dir c:\\   && echo",)
    assert [(x.name, x.value, x.line) for x in ast.directives] == [("escape", "`", 1)]


def test_directives_end_at_first_other_line() -> None:
    ast = parse("# syntax=docker/dockerfile:1\n# check=skip=all\n# hello\n# escape=`\nFROM a\n")
    assert ast.directive("syntax") == "docker/dockerfile:1"
    assert ast.directive("check") == "skip=all"
    assert ast.escape == "\\"  # the escape line came after a plain comment: just a comment


def test_blank_line_ends_directives() -> None:
    assert parse("\n# escape=`\nFROM a\n").escape == "\\"


@pytest.mark.parametrize(
    "src, message, where",
    [
        ("# escape=x\nFROM a", "invalid escape token 'x' does not match ` or \\", "1:10"),
        ("# escape=\\\n# ESCAPE=`\nFROM a", "only one escape parser directive can be used", "2:3"),
    ],
)
def test_directive_errors(src: str, message: str, where: str) -> None:
    with pytest.raises(DockerfileParseError) as info:
        parse(src, "Dockerfile")
    assert str(info.value).startswith(f"Dockerfile:{where}: {message}")


def test_bom_crlf_and_missing_final_newline() -> None:
    ast = parse(b"\xef\xbb\xbfFROM a\r\nRUN b \\\r\n  c")
    assert [dump_instruction(i) for i in ast] == ['from "a"', 'run "b   c"']


def test_lines_ignore_leading_blanks_and_directives() -> None:
    ast = parse("# syntax=x\n\n\nFROM a\n\nRUN b\n\n\n")
    assert (ast.start_line, ast.end_line) == (4, 6)
    assert [(i.start_line, i.end_line) for i in ast] == [(4, 4), (6, 6)]


def test_column_is_where_the_keyword_starts() -> None:
    assert one("    RUN x").col == 5


def test_invalid_utf8_is_kept_and_quoted_like_go() -> None:
    assert d(b"RUN echo \xff") == '(run "echo \\xff")'


def test_flag_scan_is_bytewise_like_buildkit() -> None:
    # Non-ASCII bytes in flags read as Latin-1 characters, as in BuildKit.
    assert one("COPY --chown=é a b").flags == ("--chown=Ã©",)


def test_overlong_line_is_an_error() -> None:
    with pytest.raises(DockerfileParseError, match="max allowed size of 65535"):
        parse("FROM a\nRUN " + "x" * 70000 + "\n")


def test_comments_before_instruction_are_kept() -> None:
    ast = parse("# syntax=x\n# build stage\nFROM a AS build\n")
    assert ast.instructions[0].comments == ("build stage",)


# ------------------------------------------------------------------------------- heredocs


def test_heredoc_bodies_and_lines() -> None:
    ast = parse("FROM a\nRUN <<EOF\necho hi\nEOF\nCOPY <<A <<B /d\n1\nA\n2\nB\n")
    run, copy = ast.instructions[1:]
    assert run.args == ("<<EOF",)
    assert [(h.name, h.content) for h in run.heredocs] == [("EOF", "echo hi\n")]
    assert (run.start_line, run.end_line, run.logical_end_line) == (2, 4, 2)
    assert [(h.name, h.content) for h in copy.heredocs] == [("A", "1\n"), ("B", "2\n")]


def test_chomp_only_affects_terminator_and_chomped() -> None:
    ins = parse("RUN <<-EOF\n\tx\n\tEOF\n").instructions[0]
    (doc,) = ins.heredocs
    assert doc.chomp and doc.content == "\tx\n"
    assert doc.chomped() == "x\n"


def test_heredoc_in_onbuild_and_not_in_json_or_other_instructions() -> None:
    ast = parse('ONBUILD RUN <<EOF\nx\nEOF\nRUN ["<<EOF"]\nUSER <<EOF\n')
    assert ast.instructions[0].heredocs[0].content == "x\n"
    assert ast.instructions[1].heredocs == ()
    assert ast.instructions[2].heredocs == ()


@pytest.mark.parametrize(
    "word, name, fd, expand, chomp",
    [
        ("<<EOF", "EOF", 0, True, False),
        ("3<<-EOF", "EOF", 3, True, True),
        ("<<'EOF'", "EOF", 0, False, False),
        ('<<"E"OF', "EOF", 0, False, False),
        ("<<eo\\'f", "eo'f", 0, True, False),
        ("<<  EOF", "EOF", 0, True, False),
    ],
)
def test_heredoc_markers(word: str, name: str, fd: int, expand: bool, chomp: bool) -> None:
    doc = parse_heredoc(word)
    assert doc is not None
    assert (doc.name, doc.fd, doc.expand, doc.chomp) == (name, fd, expand, chomp)


@pytest.mark.parametrize("word", ["<<", "<<a b", "x<<EOF", "<<EOF<", "'<<EOF'"])
def test_not_heredoc_markers(word: str) -> None:
    assert parse_heredoc(word) is None


def test_unterminated_heredoc_points_at_the_marker() -> None:
    with pytest.raises(DockerfileParseError) as info:
        parse("FROM a\nRUN cat <<EOF\nx\n", "Dockerfile")
    text = str(info.value)
    assert text.startswith("Dockerfile:2:9: unterminated heredoc")
    assert text.splitlines()[1:] == ["   2 | RUN cat <<EOF", "               ^^^^^"]


# ----------------------------------------------------------------------------------- errors


def test_errors_are_tlimage_errors_with_location() -> None:
    with pytest.raises(DockerfileError) as info:
        parse("FROM a\nENV\tX\n", "path/Dockerfile")
    err = info.value
    assert isinstance(err, TlimageError)
    assert err.span is not None and (err.span.line, err.span.col) == (2, 5)
    assert str(err).startswith("path/Dockerfile:2:5: ENV must have two arguments")


def test_env_new_form_needs_equals_everywhere() -> None:
    with pytest.raises(DockerfileParseError, match='can\'t find = in "b"'):
        parse("ENV a=1 b")


@pytest.mark.parametrize("src", ["", "\n\n", "# only\n# comments\n", "# syntax=x\n"])
def test_file_with_no_instructions(src: str) -> None:
    with pytest.raises(DockerfileParseError, match="file with no instructions"):
        parse(src)


# ------------------------------------------------------------------------------- properties


def test_go_quote_matches_reference_examples() -> None:
    assert go_quote('" \\ / \b \f \n \r \t \x00') == '"\\" \\\\ / \\b \\f \\n \\r \\t \\x00"'
    assert go_quote("♥☃") == '"♥☃"'
    assert go_quote("\u00a0") == '"\\u00a0"'
    assert go_quote("\U0001f600") == '"😀"'
    assert go_quote("\U000e0001") == '"\\U000e0001"'
    assert go_quote(b"\xc3") == '"\\xc3"'


_LINE_PIECES = st.sampled_from(
    ["RUN", "COPY", "ENV", "ONBUILD", "FROM", "CMD", " ", "\t", "\\", "`", "\n", "#", "<<EOF",
     "EOF", "[", "]", '"', "'", "=", "--f=1", "x", "é", "\u3000", "\r", "${a:-b}", "$"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(_LINE_PIECES, max_size=30).map("".join))
def test_parse_either_succeeds_or_raises_a_located_error(text: str) -> None:
    try:
        ast = parse(text, "Dockerfile")
    except DockerfileParseError as e:
        assert e.span is not None and e.span.line >= 1
        return
    out = dump(ast)
    assert out.count("\n") == len(ast.instructions) - 1
    # Parsing is deterministic and independent of how the input is passed.
    assert dump(parse(text.encode("utf-8", "surrogateescape"))) == out


_KEYWORDS = ["FROM", "RUN", "COPY", "ENV", "LABEL", "WORKDIR", "USER", "EXPOSE", "CMD"]
_instruction = st.tuples(
    st.sampled_from(_KEYWORDS),
    st.lists(st.sampled_from(["a", "b=1", "/x", "--flag=2", "$V"]), min_size=1, max_size=4),
    st.integers(min_value=0, max_value=2),  # continuation lines
)
_filler = st.sampled_from(["", "# note", "   "])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(_filler, max_size=2), _instruction), min_size=1, max_size=6))
def test_line_ranges_agree_with_dockerfile_parse(doc) -> None:
    """Cross-check with dockerfile-parse where both follow the same rules: no comments or
    blank lines inside continuations, no heredocs (it differs there, BuildKit is right)."""
    from dockerfile_parse import DockerfileParser

    lines: list[str] = []
    for fillers, (keyword, words, breaks) in doc:
        lines += fillers
        if keyword in ("ENV", "LABEL"):
            words = [f"k{i}={w}" for i, w in enumerate(words)]
        head = f"{keyword} {words[0]}"
        tail = words[1:]
        for _ in range(breaks):
            lines.append(head + " \\")
            head = "    " + (tail.pop(0) if tail else "z=1")
        lines.append(" ".join([head, *tail]))
    text = "FROM base\n" + "\n".join(lines) + "\n"
    ours = [(i.start_line, i.end_line, i.command) for i in parse(text)]
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    theirs = [
        (s["startline"] + 1, s["endline"] + 1, s["instruction"].lower())
        for s in parser.structure
        if s["instruction"] != "COMMENT"
    ]
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="\\` \ta\t\r", max_size=8), st.sampled_from(["\\", "`"]))
def test_continuation_rule_equals_buildkits_regex(line: str, esc: str) -> None:
    import re

    from tlimage.frontends.dockerfile.parser import _Parser

    e = re.escape(esc)
    regex = re.compile(rf"([^{e}]){e}[ \t]*\Z|^{e}[ \t]*\Z")
    expected = (regex.sub(r"\1", line), False) if regex.search(line) else (line, True)
    p = _Parser("", "Dockerfile")
    p.escape = esc
    assert p.trim_continuation(line) == expected
