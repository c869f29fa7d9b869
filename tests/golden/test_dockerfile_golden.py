"""Dockerfile lowering, golden: fixtures/dockerfile/<case>/Dockerfile compiles to expected.ir;
cases named `error-*` fail while lowering with the text in expected_error. An optional
options.json holds the front-end options (`build_args`, `target`). The parse-stage negative
cases (fixtures/dockerfile-negative/) fail the same way through the whole front end."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES, check_golden
from tlimage import ir
from tlimage.errors import DockerfileError, TlimageError
from tlimage.frontends import load

FOLDER = FIXTURES / "dockerfile"
CASES = sorted(p.name for p in FOLDER.iterdir() if p.is_dir() and not p.name.startswith("error-"))
ERRORS = sorted(p.name for p in FOLDER.iterdir() if p.is_dir() and p.name.startswith("error-"))
PARSE_NEGATIVE = sorted(p.name for p in (FIXTURES / "dockerfile-negative").iterdir() if p.is_dir())


def _options(case: str) -> dict[str, object]:
    path = FOLDER / case / "options.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.parametrize("case", CASES)
def test_dockerfile_compiles_to_expected_ir(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FOLDER / case)
    [image] = load("Dockerfile", **_options(case))
    check_golden(FOLDER / case / "expected.ir", ir.format_text(image))
    # The printed form parses back to the same image, spans included.
    assert ir.parse_text(ir.format_text(image)) == image
    # Every step points into the Dockerfile.
    for stage in image.stages:
        assert all(m.span is not None and m.span.file == "Dockerfile" for m in stage.meta)


@pytest.mark.parametrize("case", ERRORS)
def test_dockerfile_lowering_error(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FOLDER / case)
    with pytest.raises(TlimageError) as info:
        load("Dockerfile", **_options(case))
    check_golden(FOLDER / case / "expected_error", info.value.render() + "\n")


@pytest.mark.parametrize("case", PARSE_NEGATIVE)
def test_parse_stage_errors_come_through_the_front_end(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = FIXTURES / "dockerfile-negative" / case
    monkeypatch.chdir(folder)
    with pytest.raises(DockerfileError) as info:
        load("Dockerfile")
    assert str(info.value) + "\n" == (folder / "expected_error").read_text(encoding="utf-8")


def test_dockerfile_twin_of_the_dsl_data_tools_image_has_its_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(FIXTURES / "dsl" / "data-tools")
    [dsl] = load("image.py")
    monkeypatch.chdir(FOLDER / "data-tools")
    [docker] = load("Dockerfile")
    assert docker.target_stage.steps == dsl.target_stage.steps
    assert docker.digest() == dsl.digest()
    assert docker.step_digests("main") == dsl.step_digests("main")
    assert docker.name == dsl.name == "data-tools"
