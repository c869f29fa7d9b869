"""Namespace isolation, probed from inside: a RUN step (the namespace executor) and `exec` in a
namespace sandbox each get podman's default capabilities, seccomp filter mode, no_new_privs,
no mount, no usable device node of their own making, runc's /proc masks, a PID 1 that shows
nothing of the host, a pids limit that holds a fork bomb, and an out-of-memory kill said as
such."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tlimage.executor.base import RunRequest
from tlimage.sandbox import namespace as _ns

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
]

DEFAULT_CAPS = "00000000800405fb"  # podman's/buildah's: Docker's without NET_RAW MKNOD AUDIT_WRITE
PWNED = Path("/tmp/pwned")
USERNS = _ns.userns_problem() is None  # the kernel gives sandboxes a user namespace
IDS = _ns.id_range()
UID_MAP = f"0-{IDS[0]}-{IDS[2]}" if USERNS else "0-0-4294967295"
REPO = str(Path(__file__).resolve().parents[2])

PROBE = r"""
st() { grep "^$1:" /proc/self/status | cut -f2; }
echo "capeff=$(st CapEff) capprm=$(st CapPrm) capbnd=$(st CapBnd) capamb=$(st CapAmb)"
echo "seccomp=$(st Seccomp) nnp=$(st NoNewPrivs)"
echo "uid_map=$(tr -s ' \t' - < /proc/self/uid_map | sed 's/^-//')"
mkdir -p /tmp/m
mount -t tmpfs none /tmp/m 2>/dev/null && echo mount=yes || echo mount=no
mknod /tmp/blk b 7 0 2>/dev/null && echo mknod=yes || echo mknod=no
echo "ping_group_range=$(tr '\t' - < /proc/sys/net/ipv4/ping_group_range)"
head -c 1 /tmp/blk >/dev/null 2>&1 && echo devopen=yes || echo devopen=no
mknod /dev/blk2 b 7 0 2>/dev/null; head -c 1 /dev/blk2 >/dev/null 2>&1 && echo devopen2=yes || echo devopen2=no
if [ -e /proc/kcore ] && [ "$(head -c 1 /proc/kcore | wc -c)" != 0 ]; then echo kcore=open; else echo kcore=masked; fi
echo "keys=$(cat /proc/keys 2>/dev/null | wc -c) timer_list=$(cat /proc/timer_list 2>/dev/null | wc -c)"
echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo procsys=rw || echo procsys=ro
echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null && echo sys=rw || echo sys=ro
echo "init_cmdline=$(tr '\0' ' ' < /proc/1/cmdline)"
echo "init_root=$(ls /proc/1/root/ 2>/dev/null | wc -l) init_environ=$(cat /proc/1/environ 2>/dev/null | wc -c)"
echo x > /proc/1/root/tmp/pwned 2>/dev/null
echo done=1
"""


def parse(out: bytes) -> dict[str, str]:
    kv: dict[str, str] = {}
    for line in out.decode(errors="replace").splitlines():
        for part in line.split(" ") if not line.startswith("init_cmdline=") else [line]:
            k, sep, v = part.partition("=")
            if sep:
                kv[k] = v
    return kv


def check(kv: dict[str, str]) -> None:
    assert kv.get("done") == "1", kv
    assert kv["capeff"] == kv["capprm"] == kv["capbnd"] == DEFAULT_CAPS, kv
    assert kv["capamb"] == "0000000000000000"
    assert kv["seccomp"] == "2" and kv["nnp"] == "1", kv
    assert kv["mount"] == "no"
    # ICMP echo without CAP_NET_RAW: every group there is (those of the user namespace)
    assert kv["ping_group_range"] == (f"0-{IDS[2] - 1}" if USERNS else "0-2147483647"), kv
    # root inside is the range's first host id, or (a kernel without) the host's root
    assert kv["uid_map"] == UID_MAP, kv
    assert kv["devopen"] == "no" and kv["devopen2"] == "no", kv  # mknod may work; open never
    assert kv["kcore"] == "masked" and kv["keys"] == "0" and kv["timer_list"] == "0", kv
    assert kv["procsys"] == "ro" and kv["sys"] == "ro", kv
    cmdline = kv["init_cmdline"]
    assert REPO not in cmdline and "python" not in cmdline and "{" not in cmdline, cmdline
    assert kv["init_root"] == "0" and kv["init_environ"] == "0", kv
    assert not PWNED.exists()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    from tlimage.executor.bases import ensure_base

    PWNED.unlink(missing_ok=True)
    return ensure_base("busybox").tree


def step(tmp_path: Path, base: Path, script: str, network: bool = False,
         **kw) -> tuple[int, bytes]:  # fmt: skip
    from tlimage.executor.namespace import NamespaceExecutor

    out: list[bytes] = []
    ex = NamespaceExecutor(**kw)
    upper = tmp_path / f"upper{len(list(tmp_path.iterdir()))}"
    r = ex.run(RunRequest(lowers=(base,), argv=("/bin/sh", "-c", script), upper_dir=upper,
                          network=network), lambda _s, b: out.append(b))  # fmt: skip
    shutil.rmtree(upper, ignore_errors=True)
    return r.exit_code, b"".join(out)


def test_a_run_step_is_isolated_like_runc(tmp_path: Path, base: Path) -> None:
    code, out = step(tmp_path, base, PROBE)
    assert code == 0, out
    check(parse(out))


@pytest.fixture
def host_server():  # noqa: ANN201
    """A TCP server on the host's 127.0.0.1 and on its first non-loopback address."""
    import socket
    import threading

    servers = []
    addrs = ["127.0.0.1"]
    with contextlib.suppress(OSError):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source
        addrs.append(s.getsockname()[0])
        s.close()
    for a in addrs:
        srv = socket.create_server((a, 0))
        servers.append(srv)

        def serve(srv=srv) -> None:
            with contextlib.suppress(OSError):
                while True:
                    c, _ = srv.accept()
                    c.sendall(b"HOST-SECRET\n")
                    c.close()

        threading.Thread(target=serve, daemon=True).start()
    yield [(a, srv.getsockname()[1]) for a, srv in zip(addrs, servers, strict=True)]
    for srv in servers:
        srv.close()


def net_probe(servers) -> str:  # noqa: ANN001
    tries = (
        " ".join(f"{a}:{p}" for a, p in servers)
        + " "
        + " ".join(f"10.0.2.2:{p}" for _a, p in servers)
    )
    return (
        f"for t in {tries}; do nc -w 2 ${{t%:*}} ${{t#*:}} </dev/null; done; "
        "cat /etc/resolv.conf; ip -o link 2>/dev/null | cut -d: -f2; echo done=1"
    )


def test_a_run_step_with_network_cannot_reach_the_host(tmp_path: Path, base: Path,
                                                        host_server) -> None:  # fmt: skip
    code, out = step(tmp_path, base, net_probe(host_server), network=True)
    assert code == 0 and b"done=1" in out, out
    assert b"HOST-SECRET" not in out
    assert b"nameserver 10.0.2.3" in out and b"tap0" in out


def test_a_run_step_without_network_has_only_loopback(tmp_path: Path, base: Path,
                                                      host_server) -> None:  # fmt: skip
    code, out = step(tmp_path, base, net_probe(host_server), network=False)
    assert code == 0 and b"HOST-SECRET" not in out and b"tap0" not in out, out
    assert b" lo" in out


def test_a_run_step_fork_bomb_is_held_by_the_pids_limit(tmp_path: Path, base: Path) -> None:
    bomb = "i=0; while [ $i -lt 300 ]; do sleep 30 & i=$((i+1)); done"
    script = f"sh -c '{bomb}'; set -- /proc/[0-9]*; echo procs=$#"
    code, out = step(tmp_path, base, script, pids=64)
    procs = int(parse(out)["procs"])
    assert code == 0 and b"can't fork" in out and 30 < procs <= 64, out


def test_a_run_step_out_of_memory_is_said(tmp_path: Path, base: Path) -> None:
    code, out = step(tmp_path, base, "awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
                     memory_mb=32)  # fmt: skip
    assert code == 137 and b"out of memory" in out, out


IMAGE = """\
from tlimage import Image

image = Image("iso", base_image="busybox").run("mkdir -p /srv")
"""


@pytest.fixture
def sandbox(tmp_path: Path, base: Path):  # noqa: ANN201
    from tlimage.builder import build_image
    from tlimage.runtime import Sandbox

    (tmp_path / "image.py").write_text(IMAGE)
    build_image(tmp_path / "image.py", isolation="namespace")
    sb = Sandbox.create("iso:latest", backend="namespace", memory=64, timeout=300)
    yield sb
    sb.terminate()


def test_sandbox_exec_is_isolated_like_runc(sandbox) -> None:  # noqa: ANN001
    r = sandbox.exec("sh", "-c", PROBE)
    assert r.exit_code == 0, r
    check(parse(r.stdout))
    cg = sandbox._rec.extra["cgroup"]  # the host side: a pids limit holds a fork bomb
    pids_max = [Path(d, "pids.max") for d in cg["dirs"].values()
                if Path(d, "pids.max").exists()]  # fmt: skip
    assert pids_max and pids_max[0].read_text().strip() == "4096"


def test_sandbox_exec_cannot_reach_the_host(sandbox, host_server) -> None:  # noqa: ANN001
    r = sandbox.exec("sh", "-c", net_probe(host_server))
    assert r.exit_code == 0 and b"done=1" in r.stdout, r
    assert b"HOST-SECRET" not in r.stdout
    assert b"nameserver 10.0.2.3" in r.stdout and b"tap0" in r.stdout


def test_sandbox_exec_out_of_memory_is_said(sandbox) -> None:  # noqa: ANN001
    r = sandbox.exec("awk", 'BEGIN { s = "x"; while (1) s = s s }')
    assert r.exit_code == 137 and b"out of memory" in r.stderr, r
