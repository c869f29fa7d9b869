"""Cached and uncached builds of one Dockerfile: tlimage against Buildah, in one run.

    python bench/bench_build.py [--runs 5] [--isolation namespace|microvm]

Both tools build the same context (a busybox root filesystem ADDed onto scratch, two RUNs and a
COPY of 50 files), each with its own fresh storage: Buildah with overlay storage and runc
(`bud --layers --isolation oci`), tlimage with the chosen isolation. "uncached" forces every step
to run (`--no-cache` for both); "cached" is a rebuild with nothing changed; "one file changed"
edits one copied file. Wall time of the whole command, median of --runs; ratio = tlimage/Buildah.
Needs root, and Debian's buildah and runc (`apt-get install buildah runc`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCKERFILE = """\
FROM scratch
ADD rootfs.tar /
RUN mkdir -p /w && echo hi > /w/x
COPY app/ /srv/app/
RUN cat /srv/app/f1.txt > /w/y && ls /srv/app | wc -l
"""


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def busybox_tar(dest: Path, work: Path) -> None:
    from tlimage.executor.bases import ensure_base

    base = ensure_base("busybox", work / "tlcache")
    subprocess.run(["tar", "-C", str(base.tree), "-cf", str(dest), "."], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--isolation", default="namespace")
    args = ap.parse_args()
    if shutil.which("buildah") is None:
        sys.exit("buildah is not installed: apt-get install buildah runc")
    work = Path(tempfile.mkdtemp(prefix="tlimage-bench-"))
    try:
        ctx = work / "ctx"
        (ctx / "app").mkdir(parents=True)
        for i in range(50):
            (ctx / "app" / f"f{i}.txt").write_text(f"file {i}\n")
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        busybox_tar(ctx / "rootfs.tar", work)
        env = {**os.environ, "TLIMAGE_CACHE_DIR": str(work / "tlcache"),
               "TLIMAGE_STATE_DIR": str(work / "tlstate")}  # fmt: skip
        tl = [sys.executable, "-m", "tlimage", "sbx", "image", "create", "Dockerfile",
              "--isolation", args.isolation]  # fmt: skip
        bh = ["buildah", "--root", str(work / "bh"), "--runroot", str(work / "bhrun"),
              "--storage-driver", "overlay", "bud", "--layers", "--isolation", "oci",
              "-t", "bench:latest"]  # fmt: skip
        cases: dict[str, dict[str, list[float]]] = {}
        for name, tool, last in (("tlimage", tl, []), ("buildah", bh, ["."])):
            timed([*tool, *last], ctx, env)  # warm: bases, storage folders, page cache
            for _ in range(args.runs):
                cases.setdefault("uncached", {}).setdefault(name, []).append(
                    timed([*tool, "--no-cache", *last], ctx, env))  # fmt: skip
                cases.setdefault("cached", {}).setdefault(name, []).append(
                    timed([*tool, *last], ctx, env))  # fmt: skip
            for i in range(args.runs):
                (ctx / "app" / "f7.txt").write_text(f"changed {name} {i}\n")
                cases.setdefault("one file changed", {}).setdefault(name, []).append(
                    timed([*tool, *last], ctx, env))  # fmt: skip
        print(f"tlimage ({args.isolation}) vs Buildah {_buildah_version()}, "
              f"median of {args.runs} runs, whole command")  # fmt: skip
        print(f"{'case':18} {'tlimage':>9} {'buildah':>9} {'ratio':>7}")
        for case, by_tool in cases.items():
            a, b = statistics.median(by_tool["tlimage"]), statistics.median(by_tool["buildah"])
            print(f"{case:18} {a * 1000:7.0f}ms {b * 1000:7.0f}ms {a / b:6.2f}x")
    finally:
        subprocess.run(["buildah", "--root", str(work / "bh"), "--runroot", str(work / "bhrun"),
                        "rm", "--all"], capture_output=True)  # fmt: skip
        subprocess.run(["umount", "-R", str(work / "bh" / "overlay")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _buildah_version() -> str:
    out = subprocess.run(["buildah", "--version"], capture_output=True, text=True).stdout
    return out.split()[2] if out else "?"


if __name__ == "__main__":
    main()
