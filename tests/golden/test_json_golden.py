"""fixtures/json/<case>/image.json compiles to expected.ir, and each case in
fixtures/json-negative/<case>/ fails with the text in expected_error (a located message: file,
line and column, the JSON path, the value and what is allowed)."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, check_golden
from tlimage import ir
from tlimage.errors import JSONFormError
from tlimage.frontends import load

CASES = sorted(p.name for p in (FIXTURES / "json").iterdir() if p.is_dir())
NEGATIVE = sorted(p.name for p in (FIXTURES / "json-negative").iterdir() if p.is_dir())


def test_there_are_enough_negative_cases() -> None:
    assert len(NEGATIVE) >= 20


@pytest.mark.parametrize("case", CASES)
def test_json_compiles_to_expected_ir(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = FIXTURES / "json" / case
    monkeypatch.chdir(folder)
    images = load("image.json")
    text = "\n".join(ir.format_text(img) for img in images)
    check_golden(folder / "expected.ir", text)
    for img in images:
        assert ir.parse_text(ir.format_text(img)) == img


@pytest.mark.parametrize("case", NEGATIVE)
def test_json_negative(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = FIXTURES / "json-negative" / case
    monkeypatch.chdir(folder)
    with pytest.raises(JSONFormError) as info:
        load("image.json")
    rendered = info.value.render()
    check_golden(folder / "expected_error", rendered + "\n")
    # Every message is located: a file:line:col (all but the undecodable file), and past the
    # syntax errors, the JSON path of the offending value.
    assert rendered.startswith("image.json:")
    if not case.startswith(("syntax-", "not-utf8")):
        assert info.value.path or case == "not-an-object" or case.startswith("single-image")
