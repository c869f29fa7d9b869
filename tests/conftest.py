"""Shared test configuration.

`TLIMAGE_UPDATE_GOLDEN=1 pytest tests/golden` rewrites expected outputs instead of comparing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
UPDATE_GOLDEN = os.environ.get("TLIMAGE_UPDATE_GOLDEN") == "1"


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own cache and state folders unless it sets them itself."""
    base = tmp_path_factory.mktemp("tlstate")
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(base / "state"))


def check_golden(path: Path, actual: str) -> None:
    if UPDATE_GOLDEN or not path.exists():
        if not UPDATE_GOLDEN:
            pytest.fail(f"{path} is missing; run with TLIMAGE_UPDATE_GOLDEN=1 to create it")
        path.write_text(actual)
        return
    assert actual == path.read_text(), f"output differs from {path}"
