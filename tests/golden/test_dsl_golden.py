"""fixtures/dsl/<case>/image.py compiles to fixtures/dsl/<case>/expected.ir, and each negative
case in fixtures/dsl-negative/<case>/ fails with the text in expected_error."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, check_golden
from tlimage import ir
from tlimage.errors import TlimageError
from tlimage.frontends import load, select

CASES = sorted(p.name for p in (FIXTURES / "dsl").iterdir() if p.is_dir())
NEGATIVE = sorted(p.name for p in (FIXTURES / "dsl-negative").iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES)
def test_dsl_compiles_to_expected_ir(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = FIXTURES / "dsl" / case
    monkeypatch.chdir(folder)
    images = load("image.py")
    text = "\n".join(ir.format_text(img) for img in images)
    check_golden(folder / "expected.ir", text)
    # The printed form parses back to the same images, spans and force flags included.
    for img in images:
        assert ir.parse_text(ir.format_text(img)) == img


@pytest.mark.parametrize("case", NEGATIVE)
def test_dsl_negative(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = FIXTURES / "dsl-negative" / case
    monkeypatch.chdir(folder)
    with pytest.raises(TlimageError) as info:
        select(load("image.py"), None, "image.py")
    check_golden(folder / "expected_error", info.value.render() + "\n")
