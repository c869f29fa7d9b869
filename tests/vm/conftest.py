"""VM tests: whatever a test leaves running (a test that fails midway never reaches its own
`terminate()`) is terminated before its state folder goes away, so no QEMU or sandbox survives
the test run."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture(autouse=True)
def _terminate_leftover_sandboxes():
    yield
    from tlimage.runtime import list_sandboxes

    with contextlib.suppress(Exception):
        for sb in list_sandboxes(all_projects=True):  # live ones only
            with contextlib.suppress(Exception):
                sb.terminate()
