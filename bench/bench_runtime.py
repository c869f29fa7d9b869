"""Sandbox runtime: boot-to-first-exec, exec round trip, snapshot, suspend and resume, per
backend, each against a peer measured in the same run.

    sudo python bench/bench_runtime.py [--backends namespace,microvm] [--runs 3]
                                       [--bases debian-minimal,ubuntu-minimal]

Peers: the build executor running the same command once on the same layers (a throwaway
namespace sandbox, or a cold microVM) — what a sandbox costs over a one-shot run; and, for
resume, the sandbox's own cold boot; for each minimal base of the catalog (built on first use,
skipped when it cannot be: ubuntu-minimal without a configured mirror), boot-to-first-exec of
`python -c pass` against the busybox image's boot-to-first-exec. The image is the busybox test base plus one RUN, built in
a temporary state folder; the layer cache (and the microVM's guest kit) is $TLIMAGE_CACHE_DIR
or a temporary one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = """\
from tlimage import Image

image = Image("bench", base_image="busybox").run("echo hi > /greeting").env("APP_ENV", "bench")
"""


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_backend(
    backend: str, runs: int, lowers: tuple[Path, ...]
) -> list[tuple[str, float, str]]:
    from tlimage.runtime import Sandbox

    rows: list[tuple[str, float, str]] = []

    # boot to first exec (ephemeral sandboxes)
    boots = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sb = Sandbox.create("bench", backend=backend)
        r = sb.exec("cat", "/greeting")
        boots.append(time.perf_counter() - t0)
        assert r.stdout == b"hi\n", r
        sb.terminate()
    boot = median(boots)
    rows.append(("boot to first exec", boot, ""))

    peer = executor_one_shot(backend, lowers, runs)
    rows[-1] = (
        "boot to first exec",
        boot,
        f"{boot / peer:.2f}x a one-shot executor run ({peer:.3f} s)",
    )

    sb = Sandbox.create("bench", name=f"bench-{backend}", backend=backend)
    try:
        sb.exec("true")
        execs = [timed(lambda: sb.exec("true")) for _ in range(max(10, runs * 5))]
        ex = median(execs)
        rows.append(("exec `true`", ex, f"{ex / boot:.3f}x boot-to-first-exec"))

        def spawn_wait() -> None:
            p = sb.spawn("true")
            assert p.wait(30) == 0

        spawns = [timed(lambda: sb.spawn("sleep", "60").kill())
                  for _ in range(max(5, runs * 2))]  # fmt: skip
        sp = median(spawns)
        rows.append(("spawn (to running)", sp, f"{sp / ex:.2f}x exec `true`"))
        spw = median([timed(spawn_wait) for _ in range(max(5, runs * 2))])
        rows.append(("spawn `true` + wait", spw, f"{spw / ex:.2f}x exec `true`"))
        st = median([timed(lambda: sb.files.stat("/etc")) for _ in range(max(10, runs * 5))])
        rows.append(("files.stat", st, f"{st / ex:.2f}x exec `true`"))
        clones = []
        for _ in range(runs):
            t0 = time.perf_counter()
            twin = sb.clone()
            clones.append(time.perf_counter() - t0)
            twin.terminate()
        cl = median(clones)
        rows.append(("clone (filesystem)", cl, f"{cl / boot:.2f}x boot-to-first-exec"))
        if backend == "microvm":  # memory and device state too: processes continue in both
            mem = []
            for _ in range(runs):
                t0 = time.perf_counter()
                twin = sb.clone(memory=True)
                twin.exec("true")
                mem.append(time.perf_counter() - t0)
                twin.terminate()
            mc = median(mem)
            rows.append(
                ("clone (memory) to exec", mc, f"{boot / mc:.1f}x faster than boot-to-first-exec")
            )
        sb.exec("sh", "-c", "head -c 1000000 /dev/urandom > /blob")
        snap = median([timed(lambda: sb.snapshot(register=f"bench-snap-{backend}"))
                       for _ in range(runs)])  # fmt: skip
        rows.append(("snapshot (1 MB changed)", snap, ""))
        sus, res = [], []
        for _ in range(runs):
            sus.append(sb.suspend().seconds)
            res.append(sb.resume())
        s, r = median(sus), median(res)
        memory = "memory saved to a file" if backend == "microvm" else "frozen in RAM"
        rows.append(("suspend", s, memory))
        rows.append(("resume", r, f"{boot / r:.1f}x faster than boot-to-first-exec"))
        assert sb.exec("cat", "/greeting").stdout == b"hi\n"
    finally:
        sb.remove()
    return rows


def bench_bases(backend: str, runs: int, bases: list[str], busybox_boot: float
                ) -> list[tuple[str, float, str]]:  # fmt: skip
    """Boot-to-first-exec (`python -c pass`) of each minimal base, against the busybox image."""
    from tlimage import Sandbox  # the one that knows the base catalog
    from tlimage.errors import TlimageError

    rows: list[tuple[str, float, str]] = []
    for base in bases:
        try:
            Sandbox.create(base, backend=backend).terminate()  # builds the base on first use
        except TlimageError as e:
            print(f"  {base}: skipped ({e.message.splitlines()[0][:90]})")
            continue
        boots = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sb = Sandbox.create(base, backend=backend)
            r = sb.exec("python", "-c", "pass")
            boots.append(time.perf_counter() - t0)
            assert r.exit_code == 0, r
            sb.terminate()
        b = median(boots)
        rows.append((f"{base}: boot+python", b, f"{b / busybox_boot:.2f}x the busybox image's "
                     f"boot-to-first-exec ({busybox_boot:.3f} s)"))  # fmt: skip
    return rows


def executor_one_shot(backend: str, lowers: tuple[Path, ...], runs: int) -> float:
    from tlimage.executor import RunRequest, select_executor

    ex = select_executor(backend)
    if backend == "microvm":
        ex.keep_warm = False  # a cold VM per run, as a sandbox boot is
    times = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(runs):
                req = RunRequest(lowers=lowers, argv=("cat", "/greeting"),
                                 upper_dir=Path(tmp) / f"u{i}")  # fmt: skip
                times.append(timed(lambda: ex.run(req)))  # noqa: B023
    finally:
        ex.close()
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="namespace,microvm")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--bases",
        default="debian-minimal,ubuntu-minimal",
        help="minimal bases to time boot-to-first-exec of ('' for none)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_runtime needs root (namespaces, overlayfs)")
    state = tempfile.mkdtemp(prefix="tl-bench-state-")
    os.environ["TLIMAGE_STATE_DIR"] = state
    if not os.environ.get("TLIMAGE_CACHE_DIR"):
        os.environ["TLIMAGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="tl-bench-cache-")
    sys.path.insert(0, str(ROOT))
    from tlimage.builder import build_image
    from tlimage.cache.store import BlobStore
    from tlimage.cache.unpacked import unpacked_layer

    src = Path(state) / "image.py"
    src.write_text(IMAGE)
    res = build_image(src, isolation="namespace")
    store = BlobStore(None)
    lowers = tuple(unpacked_layer(store, la.digest) for la in res.manifest.layers)

    for backend in args.backends.split(","):
        if backend == "microvm":
            from tlimage.sandbox.qemu.kvm import probe_kvm
            from tlimage.sandbox.qemu.provision import provision

            ok, why = probe_kvm(provision(None))
            print(f"\nmicrovm ({'KVM' if ok else 'TCG: ' + why.splitlines()[0][:70]})")
            # warm the guest kit and the lower images so the first boot is not an outlier
            from tlimage.runtime import Sandbox

            Sandbox.create("bench", backend="microvm").terminate()
        else:
            print(f"\n{backend}")
        print(f"  {'':24} {'median':>9}")
        rows = bench_backend(backend, args.runs, lowers)
        for name, seconds, note in rows:
            print(f"  {name:24} {seconds:8.3f}s  {note}")
        bases = [b for b in args.bases.split(",") if b]
        for name, seconds, note in bench_bases(backend, args.runs, bases, rows[0][1]):
            print(f"  {name:24} {seconds:8.3f}s  {note}")


if __name__ == "__main__":
    main()
