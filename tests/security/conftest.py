"""The security suite's runs: one static probe (probe.c) executed

- as a RUN step of a build with `--isolation namespace`   (column "namespace RUN")
- by `tl sbx exec` in a namespace sandbox                  (column "namespace exec")
- by `tl sbx exec` in a microVM sandbox (TCG here; once)   (column "microVM")
- by `buildah run` (runc, containers-common's seccomp) in a `buildah from scratch` container
  with storage in a temporary folder (`--root/--runroot`), the reference   (column "runc")

The host side gives every run the same targets: a process whose command line carries a marker
(is it visible, can it be signalled), a TCP server on the host's 127.0.0.1, one on the host's
own address, one in a network namespace of the suite's own on a private range (veth pair), and
a marker folder under /tmp that an escape through /proc/1/root would write into. Each column
also gets the memory-limit run (allocate past the limit) and, where there is a `cp`, the
planted-symlink copy. The table `probe | namespace | microVM | runc` is printed at the end of
the session (also with -q), whatever the tests decided.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COLUMNS = ("namespace RUN", "namespace exec", "microVM", "runc")


class _Runs(dict):
    """column -> probe -> value; a short repr, so a failing test does not print all of it."""

    def __repr__(self) -> str:
        return f"<isolation probe runs: {', '.join(self)}>"


TABLE: dict[str, dict[str, str]] = _Runs()  # filled by `security_runs`
ERRORS: dict[str, str] = {}  # column -> why it has no values
GREETING = b"tl-sec-ok\n"
MEMORY_MB = 128  # the memory limit of the memory run; it allocates ALLOC_MB
ALLOC_MB = 512
FORKS = {"namespace RUN": 4500, "namespace exec": 4500, "microVM": 300, "runc": 4500}


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    if not TABLE and not ERRORS:
        return
    probes: list[str] = []
    for col in COLUMNS:
        for p in TABLE.get(col, {}):
            if p not in probes:
                probes.append(p)
    width = {c: max([len(c)] + [len(TABLE.get(c, {}).get(p, "")) for p in probes])
             for c in COLUMNS}  # fmt: skip
    pw = max([len("probe")] + [len(p) for p in probes])
    tr = terminalreporter
    tr.section("isolation probes: probe | namespace | microVM | runc")
    tr.write_line(" | ".join(["probe".ljust(pw)] + [c.ljust(width[c]) for c in COLUMNS]))
    tr.write_line("-+-".join(["-" * pw] + ["-" * width[c] for c in COLUMNS]))
    for p in probes:
        cells = [TABLE.get(c, {}).get(p, "-" if c not in ERRORS else "(no run)").ljust(width[c])
                 for c in COLUMNS]  # fmt: skip
        tr.write_line(" | ".join([p.ljust(pw), *cells]))
    for col, why in ERRORS.items():
        tr.write_line(f"{col}: no run: {why}")


# -- host-side targets -------------------------------------------------------------------------


class _Server:
    """A TCP server that greets every connection (the probe counts a greeting as reached)."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.create_server((addr, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            with c, contextlib.suppress(OSError):
                c.sendall(GREETING)

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def host_address() -> str | None:
    from tlimage.sandbox.network import host_addresses

    v4, _ = host_addresses()
    addrs = [a[:-3] for a in v4 if a.endswith("/32") and not a.startswith("127.")]
    return addrs[0] if addrs else None


def block_device() -> str:
    """MAJ:MIN of the host's first disk (a loop device if it has none)."""
    for d in sorted(os.listdir("/sys/block")):
        if d.startswith(("loop", "ram", "zram")):
            continue
        with contextlib.suppress(OSError):
            return Path(f"/sys/block/{d}/dev").read_text().strip()
    return "7:0"


@contextlib.contextmanager
def private_server(token: str) -> Iterator[str]:
    """A greeting server in a network namespace of the suite's own, on a private range, joined
    to the host by a veth pair: "ADDR:PORT"."""
    name, veth = f"tlsec-{token[:8]}", f"tls{token[:8]}"
    n = int(token[:4], 16) % 200 + 20
    host_ip, ns_ip = f"10.214.{n}.1", f"10.214.{n}.2"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", name)
    server = None
    try:
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", f"{host_ip}/30", "dev", veth)
        run("ip", "link", "set", veth, "up")
        run("ip", "-n", name, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")
        code = ("import socket,sys;s=socket.create_server((sys.argv[1],0));"
                "print(s.getsockname()[1],flush=True)\n"
                "while True:\n c,_=s.accept();c.sendall(b'tl-sec-ok\\n');c.close()")  # fmt: skip
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", code,
                                   ns_ip], stdout=subprocess.PIPE, text=True)  # fmt: skip
        port = int(server.stdout.readline())
        with socket.create_connection((ns_ip, port), timeout=3) as c:  # the host reaches it
            assert c.recv(16) == GREETING
        yield f"{ns_ip}:{port}"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Host:
    """The targets of one session's probes and the argv that names them."""

    def __init__(self, token: str, marker_pid: int, loopback: int, addr: str | None,
                 private: str) -> None:  # fmt: skip
        self.token = token
        self.marker_pid = marker_pid
        self.loopback = loopback
        self.addr = addr
        self.private = private
        self.blockdev = block_device()

    def argv(self, column: str) -> list[str]:
        tok = f"{self.token}-{column.replace(' ', '-')}"
        args = ["/probe", "--host-pid", str(self.marker_pid), "--loopback-port",
                str(self.loopback), "--private", self.private, "--token", tok,
                "--blockdev", self.blockdev, "--forks", str(FORKS[column])]  # fmt: skip
        if self.addr:
            args += ["--host-addr", self.addr]
        return args

    def escape_file(self, column: str) -> Path:
        return Path(f"/tmp/tl-sec-{self.token}-{column.replace(' ', '-')}")


# -- running the probe -------------------------------------------------------------------------


def tl(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
       check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    """The `tl` command (this checkout's), with TL_SEC_HOST_ENV set: a sandbox whose PID 1 shows
    it leaks the host's environment."""
    full = {**os.environ, "TL_SEC_HOST_ENV": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tlimage", *args], capture_output=True,
                          text=True, env=full, timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"tl {' '.join(args[:3])} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")  # fmt: skip
    return proc


def parse_probe(text: str) -> dict[str, str]:
    """The probe's JSON object from `text` (output around it ignored; a run killed during the
    fork bomb still gives what it printed before)."""
    start = text.find("{\n")
    if start < 0:
        raise AssertionError(f"no probe output in:\n{text[-3000:]}")
    body = text[start:]
    end = body.find("\n}")
    body = body[: end + 2] if end >= 0 else body.rstrip().rstrip(",") + "\n}"
    return json.loads(body)


def finish(values: dict[str, str], host: Host, column: str) -> dict[str, str]:
    """Probes the host decides: did the /proc/1/root write land on the host?"""
    f = host.escape_file(column)
    wrote = values.pop("proc1_root_write", "not probed")
    values["proc1_root_escape"] = (
        ("escaped: wrote the host's " + str(f)) if f.exists() else f"contained ({wrote})"
    )
    with contextlib.suppress(OSError):
        f.unlink()
    return values


def memory_verdict(code: int, output: str) -> str:
    said = "out of memory" in output
    if code == 137 and said:
        return "killed: 137, said out of memory"
    if code == 137:
        return "killed: 137, not said"
    if "survived" in output:
        return f"not limited (allocated {ALLOC_MB} MiB)"
    return f"exit {code}" + (", said out of memory" if said else "")


def run_namespace_step(host: Host, probe: Path, work: Path) -> dict[str, str]:
    col = "namespace RUN"
    ctx = work / "ctx-run"
    ctx.mkdir()
    shutil.copy(probe, ctx / "probe")
    (ctx / "Dockerfile").write_text(f"FROM busybox\nCOPY probe /probe\n"
                                    f"RUN {json.dumps(host.argv(col))}\n")  # fmt: skip
    proc = tl("sbx", "image", "create", str(ctx / "Dockerfile"), "-n", f"secprobe-run-{host.token}",
              "--isolation", "namespace", "--no-cache", "--json", check=False)  # fmt: skip
    logs = []
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("event") == "build_log" and ev.get("stream") == "stdout":
                logs.append(ev.get("data", ""))
    text = "".join(logs) if logs else proc.stdout
    values = finish(parse_probe(text), host, col)
    # memory: the step's own limit (TLIMAGE_STEP_MEMORY_MB), a step allocating past it
    (ctx / "Dockerfile").write_text(f"FROM busybox\nCOPY probe /probe\n"
                                    f'RUN ["/probe", "--alloc-mb", "{ALLOC_MB}"]\n')  # fmt: skip
    mem = tl("sbx", "image", "create", str(ctx / "Dockerfile"), "-n", f"secprobe-mem-{host.token}",
             "--isolation", "namespace", "--no-cache", check=False,
             env={"TLIMAGE_STEP_MEMORY_MB": str(MEMORY_MB)})  # fmt: skip
    out = mem.stdout + mem.stderr
    code = 137 if ("137" in out and mem.returncode != 0) else mem.returncode
    values["memory_limit"] = memory_verdict(code, out)
    return values


def image_with_probe(host: Host, probe: Path, work: Path) -> str:
    ctx = work / "ctx-image"
    ctx.mkdir()
    shutil.copy(probe, ctx / "probe")
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY probe /probe\nRUN mkdir -p /tmp\n")
    name = f"secprobe-{host.token}"
    tl("sbx", "image", "create", str(ctx / "Dockerfile"), "-n", name, "--isolation", "namespace")
    return name


def run_sandbox(host: Host, image: str, backend: str, column: str, work: Path) -> dict[str, str]:
    """The probe, then the planted-link copies, in one sandbox (with room for the fork bomb's
    processes); the memory run in a second one with MEMORY_MB (the namespace backend) or in the
    same VM (its RAM is the limit)."""
    vm = backend == "microvm"
    sid = new_sandbox(image, backend, 256 if vm else 1024)
    try:
        proc = tl("sbx", "exec", sid, *host.argv(column), check=False, timeout=1800)
        values = finish(parse_probe(proc.stdout + proc.stderr), host, column)
        if not vm:
            values["escaped_mount_ns"] = escaped_mount_ns(sid, host)
        values["cp_planted_symlink"] = cp_symlink(sid, host, work / f"cp-{backend}")
        if not vm:  # (the guest has no host path to race towards)
            values["cp_symlink_race"] = cp_race(sid, host, work / "race")
        if vm:
            values["memory_limit"] = memory_run(sid, 1024)
    finally:
        tl("sbx", "terminate", sid, check=False, timeout=600)
    if not vm:
        sid = new_sandbox(image, backend, MEMORY_MB)
        try:
            values["memory_limit"] = memory_run(sid, ALLOC_MB)
        finally:
            tl("sbx", "terminate", sid, check=False, timeout=600)
    return values


def escaped_mount_ns(sid: str, host: Host) -> str:
    """What a process of the sandbox could do on the host had it left every namespace but its
    user namespace (a mount-namespace escape): `nsenter --user` into a sandbox process's user
    namespace, as its root, in the host's mount namespace: which uid its files get in the
    host's /tmp, whether it reads /etc/shadow, whether it mounts."""
    secs = str(3000 + uuid.uuid4().int % 1000)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    sleeper = subprocess.Popen([sys.executable, "-m", "tlimage", "sbx", "exec", sid, "sleep",
                                secs], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        pid = None
        end = time.monotonic() + 60
        while pid is None and time.monotonic() < end:
            for d in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if (
                        d.name.isdigit()
                        and (d / "cmdline").read_bytes() == f"sleep\0{secs}\0".encode()
                    ):
                        pid = int(d.name)
                        break
            time.sleep(0.05)
        if pid is None:
            return "no sandbox process found"
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            return "host root (no user namespace: the host's own)"
        f = f"/tmp/tl-sec-esc-{host.token}"
        mnt = f"/tmp/tl-sec-escmnt-{host.token}"
        script = (f"touch {f}; "
                  "cat /etc/shadow >/dev/null 2>&1 && echo shadow read || echo shadow denied; "
                  f"mount -t tmpfs none {mnt} 2>/dev/null && echo mount mounted && umount {mnt} "
                  "|| echo mount denied")  # fmt: skip
        os.makedirs(mnt, exist_ok=True)
        try:
            p = subprocess.run(["nsenter", f"--user=/proc/{pid}/ns/user", "--", "/bin/sh", "-c",
                                script], capture_output=True, text=True, timeout=60)  # fmt: skip
            made = str(os.stat(f).st_uid) if os.path.exists(f) else "none"  # the host's view
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
            with contextlib.suppress(OSError):
                os.unlink(f)
        said = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
        shadow, mount = said.get("shadow", "?"), said.get("mount", "?")
        seen = f"files made as uid {made}, /etc/shadow {shadow}, mount {mount}"
        if made == "0" or shadow == "read" or mount == "mounted":
            return f"host root ({seen})"
        if made.isdigit() and shadow == "denied" and mount == "denied":
            return f"unprivileged on the host ({seen})"
        return f"not probed ({seen}; nsenter: {p.stderr.strip()[-200:]})"
    finally:
        sleeper.kill()
        sleeper.wait()


def new_sandbox(image: str, backend: str, memory: int) -> str:
    return tl("sbx", "new", "--image", image, "--backend", backend, "--memory", str(memory),
              "--timeout", "1800", timeout=1800).stdout.strip().splitlines()[-1]  # fmt: skip


def memory_run(sid: str, alloc: int) -> str:
    mem = tl("sbx", "exec", sid, "/probe", "--alloc-mb", str(alloc), check=False, timeout=1800)
    return memory_verdict(mem.returncode, mem.stdout + mem.stderr)


def cp_symlink(sid: str, host: Host, work: Path) -> str:
    """Links planted in the sandbox that point at host paths: `tl sbx cp` into them must write
    inside the sandbox, out of them must read the sandbox's files."""
    work.mkdir()
    host_dir = Path(f"/tmp/tl-sec-cpdir-{host.token}")
    host_secret = Path(f"/tmp/tl-sec-cpsecret-{host.token}")
    host_dir.mkdir(exist_ok=True)
    host_secret.write_text("host secret\n")
    try:
        tl("sbx", "exec", sid, "sh", "-c", f"ln -s {host_dir} /in-link && ln -s {host_secret} "
           f"/out-link && ln -s / /root-link")  # fmt: skip
        src = work / "payload"
        src.write_text("payload\n")
        tl("sbx", "cp", str(src), f"{sid}:/in-link/payload", check=False)
        tl("sbx", "cp", str(src), f"{sid}:/root-link{host_dir}/payload2", check=False)
        out = tl("sbx", "cp", f"{sid}:/out-link", str(work / "got"), check=False)
        leaked = []
        if any(host_dir.iterdir()):
            leaked.append(f"cp in wrote {sorted(p.name for p in host_dir.iterdir())} on the host")
        got = work / "got"  # a link copied as a link is no leak; its target's bytes are
        if got.is_file() and not got.is_symlink() and "host secret" in got.read_text():
            leaked.append("cp out read a host file")
        return (
            "escaped: " + "; ".join(leaked)
            if leaked
            else f"contained (cp out: {'refused' if out.returncode else 'the sandbox side'})"
        )
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
        host_secret.unlink(missing_ok=True)


def cp_race(sid: str, host: Host, work: Path) -> str:
    """`tl sbx cp` into a path whose link the sandbox flips between a folder of its own and a
    host folder while the copies run: no copy may land on the host."""
    work.mkdir()
    host_dir = Path(f"/tmp/tl-sec-cprace-{host.token}")
    host_dir.mkdir(exist_ok=True)
    src = work / "payload"
    src.write_text("payload\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    flip = f"mkdir -p /safe; while [ ! -e /stop ]; do ln -sfn {host_dir} /race; ln -sfn /safe /race; done"
    flipper = subprocess.Popen([sys.executable, "-m", "tlimage", "sbx", "exec", sid, "sh", "-c",
                                flip], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        landed = 0
        for i in range(12):
            if tl("sbx", "cp", str(src), f"{sid}:/race/p{i}", check=False).returncode == 0:
                landed += 1
    finally:
        tl("sbx", "exec", sid, "touch", "/stop", check=False)
        try:
            flipper.wait(60)
        except subprocess.TimeoutExpired:
            flipper.kill()
            flipper.wait()
    try:
        on_host = sorted(p.name for p in host_dir.iterdir())
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    if on_host:
        return f"escaped: {len(on_host)} of 12 copies landed on the host"
    return f"contained ({landed} of 12 copies landed in the sandbox)"


def run_runc(host: Host, probe: Path, work: Path) -> dict[str, str]:
    col = "runc"
    base = ["buildah", "--root", str(work / "bh-root"), "--runroot", str(work / "bh-run"),
            "--storage-driver", "vfs"]  # fmt: skip
    env = {**os.environ, "TL_SEC_HOST_ENV": "1", "BUILDAH_ISOLATION": "oci"}

    def bh(*a: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([*base, *a], capture_output=True, text=True, env=env, timeout=600)
        if check and p.returncode != 0:
            raise AssertionError(f"buildah {a[0]} exited {p.returncode}: {p.stderr[-2000:]}")
        return p

    runtime = shutil.which("runc") or "/usr/sbin/runc"
    containers: list[str] = []

    def container(*opts: str) -> str:
        ctr = bh("from", *opts, "scratch").stdout.strip()
        containers.append(ctr)
        bh("copy", ctr, str(probe), "/probe")
        return ctr

    try:
        ctr = container()
        proc = bh("run", "--runtime", runtime, ctr, "--", *host.argv(col), check=False)
        values = finish(parse_probe(proc.stdout), host, col)
        # runc's default has no user namespace: a process that leaves its mount namespace
        # has its credentials, which are the host's (its uid map says so)
        values["escaped_mount_ns"] = (
            f"host root (no user namespace: uid_map {values.get('uid_map')})"
            if values.get("uid_map") == "0 0 4294967295"
            else f"unprivileged (uid_map {values.get('uid_map')})"
        )
        mem = bh("run", "--runtime", runtime, container("--memory", f"{MEMORY_MB}m"), "--",
                 "/probe", "--alloc-mb", str(ALLOC_MB), check=False)  # fmt: skip
        out = mem.stdout + mem.stderr
        values["memory_limit"] = (
            "killed: SIGKILL, not said"
            if "exited on killed" in out
            else memory_verdict(mem.returncode, out)
        )
        values["cp_planted_symlink"] = runc_cp(bh, ctr, host, work)
        return values
    finally:
        for ctr in containers:
            bh("rm", ctr, check=False)


def runc_cp(bh, ctr: str, host: Host, work: Path) -> str:  # noqa: ANN001 - buildah runner
    """`buildah copy` into a link the container holds (the image has no shell: the link is
    copied in from the host) that points at a host folder."""
    link_dir = work / "link"
    link_dir.mkdir()
    host_dir = Path(f"/tmp/tl-sec-cpdir-{host.token}-runc")
    host_dir.mkdir(exist_ok=True)
    try:
        (link_dir / "in-link").symlink_to(host_dir)
        bh("copy", ctr, str(link_dir / "in-link"), "/in-link")
        (work / "payload").write_text("payload\n")
        bh("copy", ctr, str(work / "payload"), "/in-link/payload", check=False)
        return "escaped: cp in wrote on the host" if any(host_dir.iterdir()) else "contained"
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


# -- the session fixture -----------------------------------------------------------------------


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the security suite needs root (namespaces, netns, buildah)"
    for tool, pkg in (("gcc", "gcc libc6-dev"), ("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {pkg}; scripts/setup.sh does)"
    return None


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("probe") / "probe"
    proc = subprocess.run(["gcc", "-static", "-O1", "-Wall", "-o", str(out),
                           str(HERE / "probe.c")], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, f"probe.c does not compile:\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def security_runs(probe_binary: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, dict[str, str]]:  # fmt: skip
    """column -> probe -> value for every column (a column that could not run is in ERRORS)."""
    work = tmp_path_factory.mktemp("security")
    # Session fixtures start before conftest's per-test folders: give the runs their own.
    saved = {k: os.environ.get(k) for k in ("TLIMAGE_CACHE_DIR", "TLIMAGE_STATE_DIR")}
    # The user's layer cache, like tests/vm's session fixtures: the microVM's guest kit is made
    # once per machine, not once per run; the registry (state) is the run's own.
    from tlimage.cache.store import default_cache_root

    os.environ["TLIMAGE_CACHE_DIR"] = os.environ.get("TLIMAGE_SECURITY_CACHE") or str(
        default_cache_root()
    )
    os.environ["TLIMAGE_STATE_DIR"] = str(work / "state")
    token = uuid.uuid4().hex[:12]
    marker = subprocess.Popen(["bash", "-c", f"exec -a tl-sec-host-{token} sleep 3600"])
    lo = _Server("127.0.0.1")
    addr_ip = host_address()
    addr = _Server(addr_ip) if addr_ip else None
    try:
        with private_server(token) as private:
            host = Host(token, marker.pid, lo.port, f"{addr_ip}:{addr.port}" if addr else None,
                        private)  # fmt: skip
            steps = [
                ("runc", lambda: run_runc(host, probe_binary, work)),
                ("namespace RUN", lambda: run_namespace_step(host, probe_binary, work)),
            ]
            image: list[str] = []

            def sandbox(backend: str, col: str):  # noqa: ANN202
                def go() -> dict[str, str]:
                    if not image:
                        image.append(image_with_probe(host, probe_binary, work))
                    return run_sandbox(host, image[0], backend, col, work)

                return go

            steps += [
                ("namespace exec", sandbox("namespace", "namespace exec")),
                ("microVM", sandbox("microvm", "microVM")),
            ]
            if shutil.which("buildah") is None:
                ERRORS["runc"] = "buildah is not installed (scripts/setup.sh installs it)"
                steps = steps[1:]
            for col, fn in steps:
                t = time.monotonic()
                try:
                    TABLE[col] = fn()
                except Exception as e:  # noqa: BLE001 - the column says why it is empty
                    ERRORS[col] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
                print(f"security: {col} in {time.monotonic() - t:.1f} s", file=sys.stderr)
    finally:
        marker.kill()
        marker.wait()
        lo.close()
        if addr:
            addr.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return TABLE
