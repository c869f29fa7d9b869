"""Registry pull and push: tlimage against `skopeo copy` (and `podman pull`), side by side in one
run, on the same multi-layer image in a local registry (Debian's docker-registry, plain HTTP).

    python bench/bench_registry.py [--layers 6] [--mib 24] [--repeat 3] [--no-podman]
                                   [--no-cache-bench]

Pull: tlimage streams each layer once (sha256 verified, the blob stored as sent; the diff_id is
checked by the first unpack), layers in parallel, into a fresh cache; `skopeo copy docker://…
oci:DIR` writes the blobs as they are into an OCI layout (sha256 only); `podman pull` (vfs
storage) also unpacks. The first pull of the process pays for importing httpx (the median of
the repeats does not). Push: tlimage pushes the pulled image (its gzip layers as pulled) to a
fresh registry, `skopeo copy oci:DIR docker://…` the layout (gzip layers). Export: tlimage writes
the pulled image as an OCI archive (a tar), `skopeo copy oci:DIR oci-archive:FILE` the same
layout's blobs into one. Ratios are peer time / tlimage time: > 1 means tlimage is faster.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlimage.cache.cache import LayerCache
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import RegistryClient, RegistryConfig
from tlimage.oci.layout import LocalImage, export_image
from tlimage.oci.push import push


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.yml"
    cfg.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n")  # fmt: skip
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("docker-registry did not start")


def make_image(work: Path, layers: int, mib: int) -> Path:
    """An OCI layout made by umoci: `layers` layers of ~`mib` MiB each (half random, half
    text, so gzip has something to do)."""
    rng = random.Random(1)
    layout = work / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:v1"], check=True)
    text = b"".join(b"line %d of some fairly repetitive text in a file\n" % i
                    for i in range(20000))  # fmt: skip
    for i in range(layers):
        bundle = work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True,
                       capture_output=True)  # fmt: skip
        d = bundle / "rootfs" / f"layer{i}"
        d.mkdir(parents=True)
        for j in range(mib):
            (d / f"r{j}.bin").write_bytes(rng.randbytes(1 << 19) + text[: 1 << 19])
        subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], check=True,
                       capture_output=True)  # fmt: skip
    shutil.rmtree(work / "bundle", ignore_errors=True)
    return layout


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


# A builder stage whose 32 MiB the final image does not carry (only a 4 KiB file of it), and a
# final stage of 24 MiB: the fresh machine should download the final image's layers only.
CACHE_DOCKERFILE = """\
FROM busybox AS tools
RUN dd if=/dev/urandom of=/a.bin bs=1M count=32 2>/dev/null && sleep 1
RUN head -c 4096 /a.bin > /tool
FROM busybox
RUN for i in $(seq 1 2000); do echo "line $i" >> /lines.txt; done
COPY data.txt /data.txt
COPY --from=tools /tool /usr/bin/tool
RUN dd if=/dev/urandom of=/b.bin bs=1M count=24 2>/dev/null && sleep 1
"""


def cache_bench(work: Path, host: str) -> None:
    """A cold build (namespace backend) vs the same build on a fresh machine (new cache and
    state folders) with --cache-from the registry the first one wrote with --cache-to."""
    from tlimage.builder import build_image

    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(CACHE_DOCKERFILE)
    (ctx / "data.txt").write_text("data\n" * 1000)
    conf = RegistryConfig(insecure=(host,), certs_dirs=())
    ref = f"{host}/bench/cache:main"

    def on(machine: str) -> None:
        os.environ["TLIMAGE_CACHE_DIR"] = str(work / machine / "cache")
        os.environ["TLIMAGE_STATE_DIR"] = str(work / machine / "state")

    on("cold")
    t_cold = timed(lambda: build_image(ctx / "Dockerfile", isolation="namespace",
                                       registry_config=conf))  # fmt: skip
    t_export = timed(lambda: build_image(ctx / "Dockerfile", isolation="namespace",
                                         registry_config=conf, cache_to=(ref,)))  # fmt: skip
    on("fresh")
    res = None
    events: list[dict] = []

    def warm() -> None:
        nonlocal res
        res = build_image(ctx / "Dockerfile", isolation="namespace", registry_config=conf,
                          cache_from=(ref,), emit=events.append)  # fmt: skip

    t_warm = timed(warm)
    assert res is not None and res.executed_steps == 0
    print(
        f"build cold {t_cold:6.2f}s  fresh machine --cache-from {t_warm:6.2f}s  "
        f"ratio {t_cold / t_warm:.2f}  (cached rebuild + --cache-to {t_export:.2f}s)"
    )
    with RegistryClient(conf) as client:
        from tlimage.oci.cache import RemoteCache

        in_cache = sum(e.size for e, _ep, _l in RemoteCache([ref], client).entries.values())
    got = sum(float(m.group(1)) for e in events if e["event"] == "status"
              and (m := re.search(r"remote cache: fetched .*\(([0-9.]+) MB downloaded", e["message"])))  # fmt: skip
    final = sum(la.size for la in res.manifest.layers)
    print(f"fresh machine downloaded {got:.1f} MB of the {in_cache / 1e6:.1f} MB the cache "
          f"holds (the final image: {final / 1e6:.1f} MB)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mib", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--no-cache-bench", action="store_true")
    args = ap.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs it)")
    podman = shutil.which("podman") and not args.no_podman
    work = Path(tempfile.mkdtemp(prefix="tlbench-", dir="/var/tmp"))
    procs = []
    try:
        layout = make_image(work, args.layers, args.mib)
        proc, host = start_registry(work / "reg")
        procs.append(proc)
        ref = f"{host}/bench/img:v1"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:v1", f"docker://{ref}"], check=True)  # fmt: skip
        size = sum(p.stat().st_size for p in (layout / "blobs/sha256").iterdir())
        print(f"image: {args.layers} layers, {size / 1e6:.1f} MB compressed (gzip); "
              f"repeat {args.repeat}, median")  # fmt: skip
        conf = RegistryConfig(insecure=(host,), certs_dirs=())
        t_ours, t_skopeo, t_podman = [], [], []
        img = None
        for r in range(args.repeat):
            cache_dir = work / f"cache{r}"

            def ours(cache_dir: Path = cache_dir) -> None:
                nonlocal img
                with LayerCache(cache_dir) as cache:
                    img = oci_pull.pull(ref, cache, config=conf)

            t_ours.append(timed(ours))
            dest = work / f"skopeo{r}"
            t_skopeo.append(timed(lambda dest=dest: subprocess.run(
                ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                 f"oci:{dest}:v1"], check=True)))  # fmt: skip
            if podman:
                run = Path(tempfile.mkdtemp(prefix="tlp-", dir="/tmp"))
                base = ["podman", "--root", str(work / f"podman{r}"), "--runroot", str(run),
                        "--storage-driver", "vfs"]  # fmt: skip
                t_podman.append(timed(lambda base=base: subprocess.run(
                    [*base, "pull", "-q", "--tls-verify=false", ref], check=True,
                    stdout=subprocess.DEVNULL)))  # fmt: skip
                subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True)
                shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)
        o = median(t_ours)
        print(f"pull  tlimage {o:6.2f}s  skopeo copy {median(t_skopeo):6.2f}s  "
              f"ratio {median(t_skopeo) / o:.2f}")  # fmt: skip
        if t_podman:
            print(f"pull  tlimage {o:6.2f}s  podman pull {median(t_podman):6.2f}s  "
                  f"ratio {median(t_podman) / o:.2f}")  # fmt: skip

        assert img is not None
        local = LocalImage([(la.digest, la.diff_id) for la in img.layers], img.config["config"])
        e_ours, e_skopeo = [], []
        for r in range(args.repeat):
            with LayerCache(work / "cache0") as cache:
                e_ours.append(timed(lambda cache=cache, r=r: export_image(
                    cache.store, local, work / f"ours{r}.tar", ref_name="v1")))  # fmt: skip
            e_skopeo.append(timed(lambda r=r: subprocess.run(
                ["skopeo", "copy", "--quiet", f"oci:{layout}:v1",
                 f"oci-archive:{work / f'skopeo{r}.tar'}:v1"], check=True)))  # fmt: skip
            for name in (f"ours{r}.tar", f"skopeo{r}.tar"):
                (work / name).unlink()
        o = median(e_ours)
        print(f"export tlimage {o:5.2f}s  skopeo copy oci->oci-archive {median(e_skopeo):5.2f}s  "
              f"ratio {median(e_skopeo) / o:.2f}")  # fmt: skip
        p_ours, p_skopeo = [], []
        for r in range(args.repeat):
            proc2, host2 = start_registry(work / f"push{r}")
            procs.append(proc2)
            conf2 = RegistryConfig(insecure=(host2,), certs_dirs=())
            with LayerCache(work / "cache0") as cache:
                p_ours.append(timed(lambda cache=cache, conf2=conf2, host2=host2, r=r: push(
                    cache.store, local, f"{host2}/ours/img:v1", config=conf2,
                    cache_root=work / f"hints{r}")))  # fmt: skip
            p_skopeo.append(timed(lambda host2=host2: subprocess.run(
                ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v1",
                 f"docker://{host2}/skopeo/img:v1"], check=True)))  # fmt: skip
            proc2.terminate()
        o = median(p_ours)
        print(f"push  tlimage {o:6.2f}s  skopeo copy {median(p_skopeo):6.2f}s  "
              f"ratio {median(p_skopeo) / o:.2f}")  # fmt: skip
        if os.geteuid() == 0 and not args.no_cache_bench:
            cache_bench(work, host)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TLIMAGE_CACHE_DIR", tempfile.mkdtemp(prefix="tlbench-cache-"))
    main()
