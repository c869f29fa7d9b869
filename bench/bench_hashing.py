"""Build-context hashing throughput: `digest_tree` cold (stat cache empty: every byte read) and
warm (stat cache filled by a previous run: files are only stat()ed), against peers run in the
same process on the same tree: `sha256sum` (coreutils, fed by `xargs -0` in large batches) and a Python
`hashlib.sha256` loop.

    python bench/bench_hashing.py [--small N] [--large N] [--large-mib M] [--repeat R]

Every contender reads from the page cache (the tree is read once before timing), so "cold" means
"the stat cache is cold", which is what a first build after a checkout sees. Ratios > 1 mean
tlimage is faster.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlimage.cache.filehash import FileHasher, digest_tree


def generate(root: Path, small: int, large: int, large_mib: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    files: list[Path] = []
    for i in range(small):
        d = root / f"src/pkg{i % 50}/mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i}.py"
        p.write_bytes(rng.randbytes(rng.randint(200, 32_000)))
        files.append(p)
    chunk = rng.randbytes(1 << 20)
    for i in range(large):
        d = root / "assets"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"blob{i}.bin"
        with open(p, "wb") as f:
            for j in range(large_mib):
                f.write(bytes([i, j % 256]) + chunk[2:])
        files.append(p)
    return files


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=int, default=20_000, help="small files (200 B - 32 KiB)")
    ap.add_argument("--large", type=int, default=8, help="large files")
    ap.add_argument("--large-mib", type=int, default=64, help="size of each large file, MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender (best is kept)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tlimage-bench-"))
    try:
        ctx = tmp / "ctx"
        files = generate(ctx, args.small, args.large, args.large_mib)
        total = sum(p.stat().st_size for p in files)
        # Past the racy window, so the cold run's entries are trusted by the warm run.
        time.sleep(1.2)
        for p in files:  # into the page cache for everyone
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        mib = total / 2**20
        print(f"tree: {len(files)} files, {mib:.0f} MiB  (python {sys.version.split()[0]})")

        def cold():
            db = tmp / f"cold-{time.monotonic_ns()}.db"
            with FileHasher(db) as h:
                d = digest_tree(ctx, hasher=h)
            assert d.files_hashed == len(files), d.files_hashed
            return d.digest

        warm_db = tmp / "warm.db"
        with FileHasher(warm_db) as h:
            ref = digest_tree(ctx, hasher=h)

        def warm():
            with FileHasher(warm_db) as h:  # a new hasher: as a new build process would start
                d = digest_tree(ctx, hasher=h)
            assert d.files_cached == len(files) and d.files_hashed == 0
            return d.digest

        listing = b"\0".join(os.fsencode(p) for p in files) + b"\0"

        def sha256sum():
            out = subprocess.run(
                ["xargs", "-0", "sha256sum", "--"], input=listing, capture_output=True, check=True
            )
            return out.stdout.count(b"\n")

        def hashlib_loop():
            n = 0
            for p in files:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while b := f.read(1 << 20):
                        h.update(b)
                n += len(h.digest())
            return n

        t_cold, d_cold = best(cold, args.repeat)
        t_warm, d_warm = best(warm, args.repeat)
        assert d_cold == d_warm == ref.digest
        peers = {}
        if shutil.which("sha256sum") and shutil.which("xargs"):
            peers["sha256sum"] = best(sha256sum, args.repeat)[0]
        peers["hashlib.sha256"] = best(hashlib_loop, args.repeat)[0]

        def row(name: str, t: float) -> None:
            print(
                f"  {name:<28} {t * 1000:9.1f} ms  {mib / t:9.0f} MiB/s  {len(files) / t:10.0f} files/s"
            )

        print(f"results (best of {args.repeat}):")
        row("tlimage digest_tree cold", t_cold)
        row("tlimage digest_tree warm", t_warm)
        for name, t in peers.items():
            row(name, t)
        print("ratios (peer time / tlimage time; > 1 means tlimage is faster):")
        for name, t in peers.items():
            print(f"  cold vs {name:<16} {t / t_cold:7.2f}x")
            print(f"  warm vs {name:<16} {t / t_warm:7.2f}x")
        print(f"  warm vs cold             {t_cold / t_warm:7.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
