"""Each fixtures/equivalent/<case>/ holds one image written four ways (image.py, image.json,
image.ts, Dockerfile); every front end must compile it to the same IR digest as the Python DSL.

The Dockerfile column is skipped, with the reason shown, while the Dockerfile lowering
(`tlimage.frontends.dockerfile.lower`) does not exist; the .ts column needs Node and the
`typescript` npm package (`npm ci` in sdk/typescript)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

from tests.conftest import FIXTURES
from tlimage import ir
from tlimage.frontends import load

CASES = sorted(p.name for p in (FIXTURES / "equivalent").iterdir() if p.is_dir())
OTHERS = ("image.json", "image.ts", "Dockerfile")
# The operations of the JSON schema, as IR step names: the cases together use every one.
ALL_OPS = {"run", "copy", "add", "env", "workdir", "user", "entrypoint", "cmd", "label", "arg",
           "expose", "shell", "stopsignal", "healthcheck", "volume"}  # fmt: skip


def _skip_reason(front: str) -> str | None:
    if front == "Dockerfile":
        try:
            found = importlib.util.find_spec("tlimage.frontends.dockerfile.lower") is not None
        except ImportError:
            found = False
        if not found:
            return "the Dockerfile lowering (tlimage.frontends.dockerfile.lower) does not exist yet"
    if front == "image.ts":
        node = shutil.which("node")
        if node is None:
            return "node is not installed (apt-get install nodejs)"
        from tlimage.frontends.typescript import sdk_dir

        probe = ("try{require.resolve('typescript');process.exit(0)}catch{"
                 "process.exit(process.features.typescript?0:1)}")  # fmt: skip
        if subprocess.run([node, "-e", probe], cwd=sdk_dir(), check=False).returncode != 0:
            return "the typescript npm package is not installed: run `npm ci` in sdk/typescript"
    return None


def _one(front: str) -> ir.ImageDef:
    images = load(front)
    assert len(images) == 1, f"{front} defines {len(images)} images"
    return images[0]


def test_there_are_enough_cases_and_they_cover_every_operation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert len(CASES) >= 5
    used: set[str] = set()
    for case in CASES:
        folder = FIXTURES / "equivalent" / case
        assert {p.name for p in folder.iterdir()} >= {"image.py", *OTHERS}, case
        monkeypatch.chdir(folder)
        used |= {step.op for step in _one("image.py").target_stage.steps}
    assert used >= ALL_OPS, f"not covered: {sorted(ALL_OPS - used)}"


@pytest.mark.parametrize("front", OTHERS)
@pytest.mark.parametrize("case", CASES)
def test_front_end_compiles_to_the_python_digest(case: str, front: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    reason = _skip_reason(front)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(FIXTURES / "equivalent" / case)
    want = _one("image.py")
    got = _one(front)
    assert got.target_stage.steps == want.target_stage.steps
    assert got.digest() == want.digest()
    if front != "Dockerfile":  # a Dockerfile names no image and has no force flags
        assert (got.name, got.tag) == (want.name, want.tag)
        assert [m.force for m in got.target_stage.meta] == [m.force for m in want.target_stage.meta]
        # Steps point into their own file.
        assert all(m.span is not None and m.span.file == front for m in got.target_stage.meta)
