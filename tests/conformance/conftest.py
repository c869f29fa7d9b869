"""Counts conformance results per data set and prints them at the end of the run:

    BuildKit conformance: parser 33/33, parser-negative 4/4, ...

A set's total counts every case that ran; skipped cases (data absent) are reported as such.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # passed, failed, skipped


def _set_name(nodeid: str) -> str | None:
    if "tests/conformance/" not in nodeid.replace("\\", "/"):
        return None
    func = nodeid.split("::")[-1].split("[")[0]
    return func.removeprefix("test_").replace("_", "-")


@pytest.hookimpl
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    name = _set_name(report.nodeid)
    if name is None:
        return
    if report.when == "call":
        _counts[name][0 if report.passed else 1] += 1
    elif report.when == "setup" and report.skipped:
        _counts[name][2] += 1
    elif report.when == "setup" and report.failed:
        _counts[name][1] += 1


@pytest.hookimpl
def pytest_terminal_summary(terminalreporter) -> None:
    if not _counts:
        return
    parts = []
    for name, (passed, failed, skipped) in _counts.items():
        if skipped and not (passed or failed):
            parts.append(f"{name} skipped")
        else:
            parts.append(f"{name} {passed}/{passed + failed}")
    terminalreporter.write_line("BuildKit conformance: " + ", ".join(parts))
