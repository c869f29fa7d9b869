"""Differential test of the Dockerfile parser against `dockerfile-parse` (a test-only
dependency): wherever both accept a generated Dockerfile, they find the same instructions on the
same lines, and the same argument words.

Known divergences, kept out of the generated input (BuildKit's behaviour is ours; the oracle
is a line-oriented reader, not a BuildKit port):
- heredocs (`RUN <<EOF`): the oracle reads the body lines as instructions;
- the `# escape=` directive: the oracle always continues lines with a backslash;
- comments and blank lines inside a continued instruction: BuildKit drops them and goes on with
  the instruction; the oracle ends the instruction there (`test_line_ranges_agree_with_dockerfile_parse`
  in tests/unit covers the rest of the line rules);
- the arguments of ENV, LABEL and ARG: ours are BuildKit's key/value cells (`A=1` is `A`, `1`,
  `=`), the oracle keeps the text; only their words are compared, before cell splitting;
- JSON (exec) form: ours are the decoded strings, the oracle keeps the text; the line text is
  compared instead.
"""

from __future__ import annotations

import io

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tlimage.frontends.dockerfile.parser import DockerfileParseError, parse

KEYWORDS = ["FROM", "RUN", "CMD", "ENTRYPOINT", "COPY", "ADD", "ENV", "LABEL", "ARG", "WORKDIR",
            "USER", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD",
            "MAINTAINER", "run", "Copy"]  # fmt: skip
WORDS = st.sampled_from([
    "a", "b=1", "/x/y", "--flag=2", "--from=s", "$V", "${V:-d}", '"q r"', "'s t'", "k=\"v w\"",
    "é", "x\\ y", "[\"a\", \"b\"]", "[]", "AS", "&&", ";", "\\$x", "=", "80/udp", "#notcomment",
])  # fmt: skip
SPACE = st.sampled_from([" ", "  ", "\t", " \t "])


@st.composite
def dockerfiles(draw: st.DrawFn) -> str:
    lines = ["FROM base"]
    for _ in range(draw(st.integers(1, 6))):
        lines += draw(st.lists(st.sampled_from(["", "# a comment", "  "]), max_size=2))
        keyword = draw(st.sampled_from(KEYWORDS))
        words = draw(st.lists(WORDS, min_size=1, max_size=5))
        indent = draw(st.sampled_from(["", " ", "\t"]))
        line = indent + keyword
        for i, w in enumerate(words):
            if i and not w.startswith("#") and draw(st.integers(0, 4)) == 0:
                # a continuation; BuildKit allows blanks after the backslash
                lines.append(line + draw(SPACE) + "\\" + draw(st.sampled_from(["", " ", "\t"])))
                line = draw(st.sampled_from(["", " ", "    "])) + w
            else:
                line += draw(SPACE) + w
        lines.append(line + draw(st.sampled_from(["", " ", "\t"])))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline


def words(text: str) -> list[str]:
    return text.split()


@settings(max_examples=300, deadline=None)
@given(dockerfiles())
def test_instructions_and_arguments_agree_with_dockerfile_parse(text: str) -> None:
    from dockerfile_parse import DockerfileParser

    try:
        ours = parse(text, "Dockerfile").instructions
    except DockerfileParseError:
        assume(False)  # only where both accept the input
        return
    theirs = [s for s in DockerfileParser(fileobj=io.BytesIO(text.encode())).structure
              if s["instruction"] != "COMMENT"]  # fmt: skip
    assert [(i.keyword.upper(), i.start_line, i.logical_end_line or i.end_line) for i in ours] == [
        (s["instruction"], s["startline"] + 1, s["endline"] + 1) for s in theirs
    ]
    for mine, their in zip(ours, theirs, strict=True):
        # The instruction's text, continuations joined, is the same text.
        assert words(mine.original)[1:] == words(their["value"]), mine
        if mine.json or mine.command in ("env", "label", "arg", "onbuild"):
            continue  # listed above
        assert words(" ".join((*mine.flags, *mine.args))) == words(their["value"]), mine
