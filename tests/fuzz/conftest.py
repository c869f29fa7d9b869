"""Fuzz suite: generated Dockerfiles, JSON documents and DSL calls must be accepted, or rejected
with a located error from the project's error tree; never another exception. The counts of each
run are printed at the end of the test session."""

from __future__ import annotations

import collections

import pytest

COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    kinds = sorted({k for k, _ in COUNTS})
    terminalreporter.section("fuzz inputs")
    total = 0
    for kind in kinds:
        acc, rej = COUNTS[(kind, "accepted")], COUNTS[(kind, "rejected")]
        total += acc + rej
        terminalreporter.write_line(f"{kind:<11} {acc + rej:>6} inputs: {acc:>6} accepted, "
                                    f"{rej:>6} rejected with a located error")  # fmt: skip
    terminalreporter.write_line(f"{'total':<11} {total:>6} inputs, no other exception")
