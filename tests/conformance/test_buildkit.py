"""Conformance with BuildKit's own parser and shell-lexer test data.

The data lives beside the project (`../shared/conformance/buildkit/`, Apache-2.0, from
moby/buildkit) and is read in place, never copied here. When it is absent every case skips
with a message saying where it was looked for. The file formats are described in that
folder's README.md and harness_notes.md.

Sets (each case is one test, so counts show in the summary line `conftest.py` prints):
parser (`result` dumps byte-identical), parser-negative (must raise), parser-lines,
parser-heredoc, parser-extra-results (the dumps of the line/heredoc/warnings inputs),
parser-warnings, env-var (envVarTest rows A and U), words (wordsTest), process-word
(process_word_cases.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlimage.frontends.dockerfile.parser import DockerfileParseError, dump, dump_instruction, parse
from tlimage.frontends.dockerfile.shell import ShellError, process_word_with_matches, process_words

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "buildkit"
MISSING = f"BuildKit conformance data not found at {DATA}; these checks need it beside the project"

# The four negative inputs and the message BuildKit gives for each.
NEGATIVE_MESSAGES = {
    "empty_dockerfile": "file with no instructions",
    "only_comments": "file with no instructions",
    "env_no_value": "ENV must have two arguments",
    "shykes-nested-json": "when using JSON array syntax, arrays must be comprised of strings only",
}
SHELL_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def _params(build):
    """pytest params from `build()`, or one skipped param naming the missing folder."""
    if not DATA.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING), id="data-missing")]
    return build()


def _dirs(sub: str) -> list[Path]:
    return sorted(p for p in (DATA / sub).iterdir() if p.is_dir())


def _parse(path: Path):
    return parse(path.read_bytes(), str(path))


def _result_bytes(ast) -> bytes:
    return (dump(ast) + "\n").encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    "case", _params(lambda: [pytest.param(d, id=d.name) for d in _dirs("parser")])
)
def test_parser(case: Path) -> None:
    expected = (case / "result").read_bytes()
    assert _result_bytes(_parse(case / "Dockerfile")) == expected


@pytest.mark.parametrize(
    "case", _params(lambda: [pytest.param(d, id=d.name) for d in _dirs("parser-negative")])
)
def test_parser_negative(case: Path) -> None:
    with pytest.raises(DockerfileParseError) as info:
        _parse(case / "Dockerfile")
    message = NEGATIVE_MESSAGES.get(case.name)
    if message is not None:
        assert message in str(info.value)
    assert str(info.value).startswith(f"{case / 'Dockerfile'}:")


def _extra_results():
    cases = [DATA / "parser-line"]
    cases += _dirs("parser-heredoc") + _dirs("parser-warnings")
    return [pytest.param(d, id=f"{d.parent.name}/{d.name}") for d in cases]


@pytest.mark.parametrize("case", _params(_extra_results))
def test_parser_extra_results(case: Path) -> None:
    assert _result_bytes(_parse(case / "Dockerfile")) == (case / "result").read_bytes()


def _line_cases():
    expected = json.loads((DATA / "parser-line" / "expected_lines.json").read_text())
    root = expected["root"]
    cases = [pytest.param(("root", (root["start_line"], root["end_line"])), id="root")]
    for i, (start, end) in enumerate(expected["children"]):
        cases.append(pytest.param((i, (start, end)), id=f"child{i}"))
    return cases


@pytest.mark.parametrize("case", _params(_line_cases))
def test_parser_lines(case) -> None:
    which, expected = case
    ast = _parse(DATA / "parser-line" / "Dockerfile")
    if which == "root":
        assert (ast.start_line, ast.end_line) == expected
    else:
        ins = ast.instructions[which]
        assert (ins.start_line, ins.end_line) == expected


def _heredoc_cases():
    cases = []
    for d in _dirs("parser-heredoc"):
        for child in json.loads((d / "heredocs.json").read_text())["children"]:
            cases.append(pytest.param((d, child), id=f"{d.name}-{child['index']}"))
    return cases


@pytest.mark.parametrize("case", _params(_heredoc_cases))
def test_parser_heredoc(case) -> None:
    folder, child = case
    ins = _parse(folder / "Dockerfile").instructions[child["index"]]
    got = {
        "line": ins.start_line,
        "end_line": ins.end_line,
        "dump": dump_instruction(ins),
        "heredocs": [
            {"name": h.name, "fd": h.fd, "expand": h.expand, "chomp": h.chomp, "content": h.content}
            for h in ins.heredocs
        ],
    }
    assert got == {k: child[k] for k in got}


@pytest.mark.parametrize(
    "case", _params(lambda: [pytest.param(d, id=d.name) for d in _dirs("parser-warnings")])
)
def test_parser_warnings(case: Path) -> None:
    expected = json.loads((case / "warnings.json").read_text())
    warnings = [w.short for w in _parse(case / "Dockerfile").warnings]
    assert len(warnings) == expected["count"]
    for text, needles in zip(warnings, expected["contains"], strict=True):
        for needle in needles:
            assert needle in text
    assert warnings == expected["warnings_exact"]


# ------------------------------------------------------------------------------------- shell


def _env_var_cases():
    # TestShellParser4EnvVars: skip lines starting with '#', then blank ones; 3 fields.
    cases = []
    text = (DATA / "shell" / "envVarTest").read_text(encoding="utf-8")
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        fields = line.split("|")
        assert len(fields) == 3, f"envVarTest:{lineno}: {line!r}"
        platform, source, expected = (f.strip() for f in fields)
        if platform in ("A", "U"):
            cases.append(pytest.param((source, expected), id=f"L{lineno}"))
    return cases


@pytest.mark.parametrize("case", _params(_env_var_cases))
def test_env_var(case) -> None:
    source, expected = case
    if expected == "error":
        with pytest.raises(ShellError):
            process_word_with_matches(source, SHELL_ENV)
    else:
        assert process_word_with_matches(source, SHELL_ENV).result == expected


def _words_cases():
    # TestShellParser4Words: ENV lines accumulate; other lines are `input | a,b,c`.
    cases = []
    env: list[str] = []
    text = (DATA / "shell" / "wordsTest").read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            env.append(line[3:].lstrip(" "))
            continue
        fields = line.split("|")
        assert len(fields) == 2, f"wordsTest:{lineno}: {line!r}"
        expected = fields[1].lstrip(" ").split(",")
        cases.append(pytest.param((fields[0].strip(), expected, tuple(env)), id=f"L{lineno}"))
    return cases


@pytest.mark.parametrize("case", _params(_words_cases))
def test_words(case) -> None:
    source, expected, env = case
    try:
        got = process_words(source, list(env))
    except ShellError:
        got = ["error"]
    assert got == expected


def _process_word_cases():
    data = json.loads((DATA / "shell" / "process_word_cases.json").read_text(encoding="utf-8"))
    return [pytest.param(c, id=f"{i}") for i, c in enumerate(data["cases"])]


@pytest.mark.parametrize("case", _params(_process_word_cases))
def test_process_word(case) -> None:
    if case["expected_error"]:
        with pytest.raises(ShellError) as info:
            process_word_with_matches(case["input"], case["envs"])
        if case.get("error_contains"):
            assert case["error_contains"] in str(info.value)
        return
    got = process_word_with_matches(case["input"], case["envs"])
    assert got.result == case["expected"]
    if "matched" in case:
        assert sorted(got.matched) == sorted(case["matched"])
        assert sorted(got.unmatched) == sorted(case["unmatched"])
