"""Executor benchmark: microVM vs namespace sandbox on the busybox base, in one process.

    python bench/bench_executor.py [--steps N] [--base busybox|debian-minimal]

Prints, for the microVM (KVM when the probe passes, else TCG): cold boot-to-first-output (a
fresh VM per step) and the per-step time in a warm VM; for the namespace sandbox: per-step time;
then ratios against the namespace run. Needs root and qemu-system-x86. The hardened namespace
step against `buildah run` (+ commit) and the sandbox create rate: bench_isolation.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlimage.executor.base import RunRequest  # noqa: E402
from tlimage.executor.bases import ensure_base  # noqa: E402

STEP = ("/bin/sh", "-c", "echo hi; mkdir -p /x; echo data > /x/f")


def timed_step(ex, lowers, upper: Path) -> tuple[float, float]:
    """(seconds to the first output byte, seconds to the result)."""
    first: list[float] = []
    t0 = time.perf_counter()
    ex.run(
        RunRequest(lowers=lowers, argv=STEP, upper_dir=upper),
        lambda s, b: first or first.append(time.perf_counter() - t0),
    )
    total = time.perf_counter() - t0
    shutil.rmtree(upper)
    return (first[0] if first else total), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cold", type=int, default=2, help="cold microVM boots to time")
    ap.add_argument("--base", default="busybox")
    args = ap.parse_args()

    from tlimage.executor.microvm import MicroVMExecutor
    from tlimage.executor.namespace import NamespaceExecutor

    base = ensure_base(args.base)
    lowers = (base.tree,)
    tmp = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    try:
        ns = NamespaceExecutor()
        timed_step(ns, lowers, tmp / "warmup")
        ns_times = [timed_step(ns, lowers, tmp / f"ns{i}")[1] for i in range(args.steps)]

        cold = MicroVMExecutor(keep_warm=False)
        print(f"microVM acceleration: {cold.accel} ({cold.accel_reason})")
        timed_step(cold, lowers, tmp / "image-warmup")  # builds the cached ext4 image
        cold_runs = [timed_step(cold, lowers, tmp / f"cold{i}") for i in range(args.cold)]
        cold.close()

        warm = MicroVMExecutor(keep_warm=True)
        timed_step(warm, lowers, tmp / "boot")
        warm_times = [timed_step(warm, lowers, tmp / f"warm{i}")[1] for i in range(args.steps)]
        boots = warm.boots
        warm.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ns_med = statistics.median(ns_times)
    first_med = statistics.median(f for f, _ in cold_runs)
    cold_med = statistics.median(t for _, t in cold_runs)
    warm_med = statistics.median(warm_times)
    print(f"base: {args.base}; step: {' '.join(STEP)}")
    print(f"namespace   per step              {ns_med * 1000:8.1f} ms  (median of {args.steps})")
    print(f"microvm     boot to first output  {first_med * 1000:8.1f} ms  (median of {args.cold})")
    print(f"microvm     cold step total       {cold_med * 1000:8.1f} ms")
    print(
        f"microvm     warm step             {warm_med * 1000:8.1f} ms  "
        f"(median of {args.steps}, {boots} boot)"
    )
    print(f"ratio  microvm cold / namespace   {cold_med / ns_med:8.1f}x")
    print(f"ratio  microvm warm / namespace   {warm_med / ns_med:8.1f}x")


if __name__ == "__main__":
    main()
