"""A sandbox's private network: `sandbox.network.attach` against its peers, in one run.

    python bench/bench_network.py [--runs 20]     (root; slirp4netns, nftables; passt optional)

Each run makes a fresh network namespace (`unshare --net sleep`) and times, until the network
is usable (a default route in the namespace):
- attach(allow)      lo up, the nft rules written from the host, slirp4netns ready
- attach(none)       lo up only
- slirp4netns bare   the helper alone, no rules (the floor attach pays on top of)
- pasta              Debian's passt in the same role, when installed
Prints medians and each one's ratio to the bare slirp4netns start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlimage.sandbox.network import NetworkPolicy, attach  # noqa: E402


def fresh_ns() -> subprocess.Popen:
    p = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    mine = os.stat("/proc/self/ns/net").st_ino
    while True:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino != mine:
                return p
        time.sleep(0.001)


def has_route(pid: int) -> bool:
    lines = Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]
    return any(line.split()[1:2] == ["00000000"] for line in lines)


def wait_route(pid: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not has_route(pid):
        if time.monotonic() > deadline:
            raise SystemExit("the helper did not configure the namespace")
        time.sleep(0.0005)


def case_attach(mode: str) -> Callable[[subprocess.Popen], Callable[[], None]]:
    def run(p: subprocess.Popen) -> Callable[[], None]:
        h = attach(p.pid, NetworkPolicy(mode))
        return h.close

    return run


def case_slirp(p: subprocess.Popen) -> Callable[[], None]:
    h = subprocess.Popen(["slirp4netns", "--configure", "--disable-host-loopback", str(p.pid),
                          "tap0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_route(p.pid)
    return lambda: (h.kill(), h.wait())


def case_pasta(p: subprocess.Popen) -> Callable[[], None]:
    # Debian 12's pasta drops to nobody as root and cannot open /proc/PID/ns/net: give it an fd.
    fd = os.open(f"/proc/{p.pid}/ns/net", os.O_RDONLY)
    h = subprocess.Popen(["pasta", "-f", "-q", "--runas", "0:0", "--config-net", "-T", "none",
                          "-U", "none", "-t", "none", "-u", "none", "--no-map-gw", "-4",
                          "--netns", f"/proc/self/fd/{fd}"], pass_fds=(fd,),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(fd)
    wait_route(p.pid)
    return lambda: (h.kill(), h.wait())


def measure(fn: Callable[[subprocess.Popen], Callable[[], None]], runs: int) -> float:
    times = []
    for _ in range(runs):
        p = fresh_ns()
        try:
            t0 = time.perf_counter()
            close = fn(p)
            times.append(time.perf_counter() - t0)
            close()
        finally:
            p.kill()
            p.wait()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    runs = ap.parse_args().runs
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, nft)")
    cases: dict[str, Callable] = {
        "slirp4netns bare": case_slirp,
        "attach(allow)": case_attach("allow"),
        "attach(deny)": case_attach("deny"),
        "attach(none)": case_attach("none"),
    }
    if shutil.which("pasta"):
        cases["pasta"] = case_pasta
    results = {name: measure(fn, runs) for name, fn in cases.items()}
    floor = results["slirp4netns bare"]
    print(f"{'case':<18} {'median':>10} {'vs slirp4netns':>15}   ({runs} runs each)")
    for name, t in results.items():
        print(f"{name:<18} {t * 1000:>8.1f} ms {t / floor:>14.2f}x")


if __name__ == "__main__":
    main()
