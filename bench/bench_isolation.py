"""Hardened namespace isolation: per-step overhead and sandbox create rate, against Buildah and
runc measured in the same run.

    python bench/bench_isolation.py [--steps 30] [--sandboxes 20] [--threads 4]
                                    [--skip-steps] [--skip-create]

Needs root, buildah and runc. Everything runs on the busybox base (built on first use).

1. Per-step overhead of a trivial RUN (`/bin/true`), hardened (caps, seccomp, pivot_root,
   cgroup limits), with and without network (slirp4netns behind nft rules):
   - tlimage run        NamespaceExecutor.run: overlay, sandbox, the upper normalized
   - tlimage run+diff   the same plus layer_from_upper into a blob store (what the builder
                        does per executed step: the diff tarred, hashed, compressed, stored)
   - buildah run        `buildah run --runtime runc [--network none] c /bin/true` on a container
                        made from an image of the same tree (--root/--runroot in a temp folder);
                        with network: its default for root, a CNI bridge (Buildah 1.28 as root
                        cannot use slirp4netns; crun refuses hybrid cgroup hosts)
   - buildah run+commit the same plus `buildah commit c` (its diff capture)
   Ratios: tlimage run / buildah run, tlimage run+diff / buildah run+commit.
   Targets (issue 11): <= 50 ms and <= 0.2x Buildah.
2. Sandbox create rate through the Python API: Sandbox.create("bench", backend="namespace")
   (a registered image: busybox + one RUN; and once by the catalog base's name) for N
   sandboxes, sequentially and from a thread pool, then terminate; through the HTTP API
   (`tl sbx serve`, --threads clients on keep-alive connections POSTing /v1/sandboxes, the
   issue's measure), with and without network; sandboxes/s against
   `runc run -d` of the same tree (a sleeping container, its default spec: namespaces,
   default caps, seccomp off in runc's bare spec) and the issue's >= 50/s target.
Each line prints the median and p90 in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRUE = ("/bin/true",)
IMAGE = """\
from tlimage import Image

image = Image("bench", base_image="busybox").run("echo hi > /greeting")
"""


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


def line(label: str, xs: list[float], note: str = "") -> None:
    print(f"  {label:34} median {statistics.median(xs) * 1000:8.1f} ms   "
          f"p90 {p90(xs) * 1000:8.1f} ms  {note}")  # fmt: skip


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- 1. per-step overhead ---------------------------------------------------------------------


def tlimage_steps(tree: Path, tmp: Path, steps: int, network: bool) -> tuple[list, list]:
    from tlimage.cache.layer import layer_from_upper
    from tlimage.cache.store import BlobStore
    from tlimage.executor.base import RunRequest
    from tlimage.executor.namespace import NamespaceExecutor

    ex = NamespaceExecutor()
    store = BlobStore(tmp / "blobs")
    run_only, with_diff = [], []

    def step(i: int, diff: bool) -> float:
        upper = tmp / f"u-{network}-{diff}-{i}"
        t0 = time.perf_counter()
        res = ex.run(RunRequest(lowers=(tree,), argv=TRUE, upper_dir=upper, network=network))
        if diff:
            layer_from_upper(upper, store, opaque_dirs=res.opaque)
        t = time.perf_counter() - t0
        assert res.exit_code == 0, res
        shutil.rmtree(upper)
        return t

    step(-1, True)  # warm-up
    for i in range(steps):  # interleaved, so load drifts hit both alike
        run_only.append(step(i, False))
        with_diff.append(step(i, True))
    return run_only, with_diff


class Buildah:
    def __init__(self, tree: Path, tmp: Path) -> None:
        self.g = ["buildah", "--root", str(tmp / "root"), "--runroot", str(tmp / "runroot"),
                  "--storage-driver", "overlay"]  # fmt: skip
        base = self.out("from", "scratch")
        mnt = Path(self.out("mount", base))
        subprocess.run(["cp", "-a", f"{tree}/.", str(mnt)], check=True)
        self.out("umount", base)
        self.out("commit", "-q", base, "bench-base")
        self.out("rm", base)
        self.c = self.out("from", "bench-base")

    def out(self, *args: str) -> str:
        r = subprocess.run([*self.g, *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"buildah {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def run(self, network: bool) -> None:
        # crun refuses this host's hybrid cgroup layout: runc, as tlimage's other peers use
        net = [] if network else ["--network", "none"]  # default: its CNI bridge network
        self.out("run", "--runtime", "runc", *net, self.c, *TRUE)

    def commit(self) -> None:
        self.out("commit", "-q", self.c, "bench-step")

    def steps(self, steps: int, network: bool) -> tuple[list, list]:
        self.run(network)
        run_only, with_commit = [], []
        for _ in range(steps):
            run_only.append(timed(lambda: self.run(network)))
            t0 = time.perf_counter()
            self.run(network)
            self.commit()
            with_commit.append(time.perf_counter() - t0)
        return run_only, with_commit

    def close(self) -> None:
        subprocess.run([*self.g, "rm", "--all"], capture_output=True)
        subprocess.run([*self.g, "rmi", "--all", "--force"], capture_output=True)


def bench_steps(tree: Path, steps: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-iso-", dir="/var/tmp"))
    try:
        bh = Buildah(tree, tmp / "buildah")
        try:
            for network in (False, True):
                what = "network (slirp4netns)" if network else "no network"
                print(f"\ntrivial RUN /bin/true, hardened, {what}; {steps} steps each")
                t_run, t_diff = tlimage_steps(tree, tmp, steps, network)
                b_run, b_commit = bh.steps(steps, network)
                line("tlimage run", t_run)
                line("tlimage run + layer_from_upper", t_diff)
                line("buildah run", b_run)
                line("buildah run + commit", b_commit)
                m = statistics.median
                print(f"  ratio tlimage run / buildah run          {m(t_run) / m(b_run):6.3f}x"
                      f"   (target <= 0.2x)")  # fmt: skip
                print(f"  ratio tlimage run+diff / buildah run+commit "
                      f"{m(t_diff) / m(b_commit):6.3f}x   "
                      f"(target <= 0.2x; run+diff <= 50 ms: "
                      f"{'yes' if m(t_diff) <= 0.05 else 'no'})")  # fmt: skip
        finally:
            bh.close()
    finally:
        subprocess.run(["umount", "-R", "-l", str(tmp / "buildah" / "root" / "overlay")],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


# -- 2. sandbox create rate -------------------------------------------------------------------


def create_rate(n: int, threads: int, network: bool, image: str = "bench"
                ) -> tuple[float, list[float]]:  # fmt: skip
    from tlimage import Sandbox

    each: list[float] = []

    def one(_i: int):  # noqa: ANN202
        t0 = time.perf_counter()
        sb = Sandbox.create(image, backend="namespace", network=network)
        each.append(time.perf_counter() - t0)
        return sb

    t0 = time.perf_counter()
    if threads <= 1:
        boxes = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            boxes = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    for sb in boxes:
        sb.terminate()
    return n / wall, each


def api_rate(n: int, threads: int, network: bool) -> tuple[float, list[float]]:
    """Creates through the HTTP API: a `tl sbx serve` process, `threads` clients on keep-alive
    connections each POSTing /v1/sandboxes; then DELETE each."""
    import http.client

    from tlimage.runtime.http import api_token

    code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
    srv = subprocess.Popen([sys.executable, "-c", code, "sbx", "serve", "-q", "--listen",
                            "127.0.0.1:0", "--backend", "namespace"], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        assert srv.stdout is not None
        url = srv.stdout.readline().split(" on ", 1)[1].strip()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        auth = {"Authorization": f"Bearer {api_token()}", "Content-Type": "application/json"}
        body = json.dumps({"image": "bench", "network": network}).encode()
        each: list[float] = []
        ids: list[str] = []

        def client(count: int) -> None:
            c = http.client.HTTPConnection(host, int(port), timeout=120)
            for _ in range(count):
                t1 = time.perf_counter()
                c.request("POST", "/v1/sandboxes", body=body, headers=auth)
                r = c.getresponse()
                data = r.read()
                if r.status >= 300:
                    raise SystemExit(f"POST /v1/sandboxes: {r.status} {data[:300]!r}")
                each.append(time.perf_counter() - t1)
                ids.append(json.loads(data)["sandbox_id"])
            c.close()

        warm = http.client.HTTPConnection(host, int(port), timeout=120)  # the server's first
        warm.request("POST", "/v1/sandboxes", body=body, headers=auth)  # create starts its
        r = warm.getresponse()  # spawner
        ids.append(json.loads(r.read())["sandbox_id"])
        counts = [n // threads + (i < n % threads) for i in range(threads)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(client, counts))
        wall = time.perf_counter() - t0
        for sid in ids:
            warm.request("DELETE", f"/v1/sandboxes/{sid}", headers=auth)
            warm.getresponse().read()
        warm.close()
    finally:
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    return n / wall, each


def runc_rate(tree: Path, n: int) -> tuple[float, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-runc-", dir="/var/tmp"))
    ids = [f"tlbench-{os.getpid()}-{i}" for i in range(n)]
    each: list[float] = []
    try:
        subprocess.run(["runc", "spec", "-b", str(tmp)], check=True)
        spec = json.loads((tmp / "config.json").read_text())
        spec["root"] = {"path": str(tree), "readonly": True}  # shared by every container
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["sleep", "3600"]
        (tmp / "config.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        for cid in ids:
            t1 = time.perf_counter()
            subprocess.run(["runc", "run", "-d", "-b", str(tmp), cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            each.append(time.perf_counter() - t1)
        wall = time.perf_counter() - t0
    finally:
        for cid in ids:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return n / wall, each


def bench_create(tree: Path, n: int, threads: int) -> None:
    from tlimage import Sandbox
    from tlimage.builder import build_image

    src = Path(os.environ["TLIMAGE_STATE_DIR"]) / "image.py"
    src.write_text(IMAGE)
    build_image(src, isolation="namespace")
    Sandbox.create("bench", backend="namespace").terminate()  # warm-up
    print(
        f"\nsandbox create rate, {n} sandboxes of a registered image (busybox + one RUN), "
        "namespace backend (hardened)"
    )
    rates = {}
    for network in (False, True):
        for th in (1, threads):
            rate, each = create_rate(n, th, network)
            label = f"{'network' if network else 'no network'}, {th} thread{'s' * (th > 1)}"
            rates[(network, th)] = rate
            line(f"create {label}", each, f"{rate:6.1f} sandboxes/s")
    for network in (False, True):
        rate, each = api_rate(n, threads, network)
        rates[("api", network)] = rate
        line(f"HTTP API create, {'network' if network else 'no network'}, {threads} cl.", each,
             f"{rate:6.1f} sandboxes/s")  # fmt: skip
    rate, each = create_rate(n, 1, False, "busybox")
    line("create by base name, no net, 1 th.", each, f"{rate:6.1f} sandboxes/s  (catalog base: "
         "opens a layer-cache session per create)")  # fmt: skip
    r_rate, r_each = runc_rate(tree, n)
    line("runc run -d (sleep), sequential", r_each, f"{r_rate:6.1f} containers/s")
    api = rates[("api", False)]
    best = max(rates.values())
    print(f"  ratio HTTP API create rate (no network) / runc run -d   {api / r_rate:6.2f}x")
    print(f"  HTTP API create rate {api:.1f}/s (with network {rates[('api', True)]:.1f}/s); "
          f"best rate {best:.1f}/s; target >= 50/s through the API: "
          f"{'yes' if api >= 50 else 'no'}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sandboxes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-create", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_isolation needs root (namespaces, overlayfs, buildah, runc)")
    for tool in ("buildah", "runc"):
        if not shutil.which(tool):
            sys.exit(f"bench_isolation needs {tool} (scripts/setup.sh installs it)")
    state = tempfile.mkdtemp(prefix="tl-bench-state-")
    os.environ["TLIMAGE_STATE_DIR"] = state
    from tlimage.executor.bases import ensure_base

    tree = ensure_base("busybox").tree
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} cpus")  # fmt: skip
    try:
        if not args.skip_steps:
            bench_steps(tree, args.steps)
        if not args.skip_create:
            bench_create(tree, args.sandboxes, args.threads)
    finally:
        # A run that failed half-way leaves sandboxes running; their records go with `state`.
        from tlimage.runtime import list_sandboxes

        for sb in list_sandboxes(all_projects=True):
            with contextlib.suppress(Exception):
                sb.terminate()
        shutil.rmtree(state, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
