"""VM tests: whatever a test leaves running (a test that fails midway never reaches its own
`terminate()`) is terminated before its state folder goes away, so no QEMU or sandbox survives
the test run. Only what the test made is swept: the sweep looks in the test's own state folder
(tests/conftest.py gives each test one) and spares sandboxes that were live before it began."""

from __future__ import annotations

import contextlib
import os

import pytest


def _live(state: str) -> dict[str, object]:
    from tlimage.runtime import list_sandboxes

    saved = os.environ.get("TLIMAGE_STATE_DIR")
    os.environ["TLIMAGE_STATE_DIR"] = state
    try:
        with contextlib.suppress(Exception):
            return {sb.id: sb for sb in list_sandboxes(all_projects=True)}  # live ones only
        return {}
    finally:
        if saved is None:
            os.environ.pop("TLIMAGE_STATE_DIR", None)
        else:
            os.environ["TLIMAGE_STATE_DIR"] = saved


@pytest.fixture(autouse=True)
def _terminate_leftover_sandboxes(_isolated_state):  # noqa: ANN001, ANN202
    # Asks for _isolated_state so that it runs inside it: the sweep sees the test's folder.
    state = os.environ["TLIMAGE_STATE_DIR"]  # the test's own (tests/conftest.py)
    before = set(_live(state))
    yield
    for sid, sb in _live(state).items():
        if sid not in before:
            with contextlib.suppress(Exception):
                sb.terminate()


@contextlib.contextmanager
def state_in(base):  # noqa: ANN001, ANN201 - a Path; a context manager
    """TLIMAGE_CACHE_DIR and TLIMAGE_STATE_DIR under `base` while the block runs: a sandbox
    that a module's tests share (one microVM boot) lives there, not in one test's folders."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLIMAGE_CACHE_DIR", str(base / "cache"))
        mp.setenv("TLIMAGE_STATE_DIR", str(base / "state"))
        yield
