"""CLI start-up: `tl --help` and `tl sbx image compile` against a bare interpreter, in one run.

    python bench/bench_cli.py [--runs 20]

Prints the median wall time of each command and its ratio to `python -c pass` (the floor any
Python CLI pays), plus the modules `tl --help` imports that it need not.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_time(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)  # fmt: skip
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    runs = ap.parse_args().runs
    py = sys.executable
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "tl --help": [py, "-m", "tlimage", "--help"],
        "tl sbx image --help": [py, "-m", "tlimage", "sbx", "image", "--help"],
        "tl sbx image compile (DSL)": [
            py,
            "-m",
            "tlimage",
            "sbx",
            "image",
            "compile",
            "examples/data_tools/image.py",
        ],  # fmt: skip
    }
    base = None
    print(f"{'command':32} {'median':>9} {'vs python':>10}")
    for name, argv in cases.items():
        t = median_time(argv, runs)
        base = base or t
        print(f"{name:32} {t * 1000:7.1f}ms {t / base:9.2f}x")
    out = subprocess.run([py, "-X", "importtime", "-m", "tlimage", "--help"], cwd=ROOT,
                         capture_output=True, text=True).stderr  # fmt: skip
    heavy = [
        line.split("|")[-1].strip()
        for line in out.splitlines()
        if line.startswith("import time:")
        and line.split("|")[-1]
        .strip()
        .startswith(("tlimage.ir", "tlimage.cache", "tlimage.executor", "lark", "zstandard"))
    ]
    print("heavy modules imported by `tl --help`:", ", ".join(heavy) or "none")


if __name__ == "__main__":
    main()
