"""A sandbox's private network, for real: processes in fresh network namespaces (`unshare
--net`) get slirp4netns and the host-written nft rules through `sandbox.network.attach`; the
servers they try are on the host (127.0.0.1 and its own addresses) and in test network
namespaces this file makes (veth pairs, addresses only inside them). No traffic leaves the
machine except DNS queries through slirp's forwarder."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage.sandbox import network
from tlimage.sandbox.network import NetworkPolicy, attach

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nft need root"),
    pytest.mark.skipif(network.check_host() is not None,
                       reason=f"{network.check_host()} (scripts/setup.sh installs it)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]  # fmt: skip

_seq = itertools.count()

PROBE = r"""
import json, socket, sys
out = {}
for spec in json.loads(sys.argv[1]):
    kind, host, port = spec
    key = f"{kind}:{host}:{port}"
    try:
        if kind == "dns":
            out[key] = sorted({a[4][0] for a in socket.getaddrinfo(host, None,
                                                                   proto=socket.IPPROTO_TCP)})
        else:
            s = socket.create_connection((host, port), timeout=3)
            out[key] = s.recv(16).decode()
            s.close()
    except OSError as e:
        out[key] = f"error: {e.strerror or e}"
print(json.dumps(out))
"""


@contextlib.contextmanager
def sandbox_ns(pass_fds: tuple[int, ...] = ()) -> Iterator[subprocess.Popen]:
    """A process alone in a fresh network namespace (what a sandbox's PID 1 is)."""
    p = subprocess.Popen(["unshare", "--net", "sleep", "600"], pass_fds=pass_fds)
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino != mine:
                    break
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.002)
        yield p
    finally:
        p.kill()
        p.wait()


def probe(p: subprocess.Popen, resolv: str, *checks: tuple[str, str, int],
          drop_net_admin: bool = True) -> dict[str, object]:  # fmt: skip
    """Run the connect/resolve probe inside `p`'s network namespace with `resolv` as its
    /etc/resolv.conf and, like a hardened sandbox process, without CAP_NET_ADMIN."""
    rc = Path(f"/tmp/tl-net-resolv-{os.getpid()}-{next(_seq)}")
    rc.write_text(resolv)
    try:
        inner = [sys.executable, "-I", "-c", PROBE, json.dumps(checks)]
        if drop_net_admin:
            inner = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--", *inner]
        script = f'mount --bind "{rc}" /etc/resolv.conf && exec "$@"'
        proc = subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", "unshare", "--mount",
                               "sh", "-c", script, "sh", *inner], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    finally:
        rc.unlink()
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def reached(result: dict[str, object], host: str, port: int) -> bool:
    value = result[f"tcp:{host}:{port}"]
    return value == "hello"


@contextlib.contextmanager
def host_server() -> Iterator[int]:
    """A TCP server on all of the host's addresses (127.0.0.1 and eth0's included)."""
    srv = socket.create_server(("0.0.0.0", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = False

    def serve() -> None:
        while not stop:
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.sendall(b"hello")

    import threading

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop = True
        t.join()
        srv.close()


SERVE = (r"import socket,sys;s=socket.create_server((sys.argv[1],0));"
         r"print(s.getsockname()[1],flush=True)" "\n"
         r"while True:" "\n" r" c,_=s.accept();c.sendall(b'hello');c.close()")  # fmt: skip


@contextlib.contextmanager
def server_netns(host_addr: str, ns_addr: str, prefix: int) -> Iterator[tuple[str, int, str]]:
    """A network namespace of the test's own, joined to the host by a veth pair, with a TCP
    server on `ns_addr`: (address, port, the namespace's name)."""
    n = next(_seq)
    name = f"tlnet{os.getpid()}-{n}"
    veth = f"tlv{os.getpid() % 100000}{n}"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", name)
    server = None
    try:
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", f"{host_addr}/{prefix}", "dev", veth)
        run("ip", "link", "set", veth, "up")
        run("ip", "-n", name, "addr", "add", f"{ns_addr}/{prefix}", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", SERVE,
                                   ns_addr], stdout=subprocess.PIPE, text=True)  # fmt: skip
        port = int(server.stdout.readline())
        # the host itself reaches it: whatever the sandbox does not reach is the rules' doing
        with socket.create_connection((ns_addr, port), timeout=3) as c:
            assert c.recv(16) == b"hello"
        yield ns_addr, port, name
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def host_address() -> str:
    v4, _ = network.host_addresses()
    addrs = [a[:-3] for a in v4 if a.endswith("/32") and not a.startswith("127.")]
    if not addrs:
        pytest.skip("the host has no address besides loopback")
    return addrs[0]


def helpers() -> list[int]:
    """Live slirp4netns processes."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                if (
                    argv
                    and argv[0].endswith(b"slirp4netns")
                    and Path(f"/proc/{d}/stat").read_text().split(") ")[1][0] != "Z"
                ):
                    found.append(int(d))
    return found


# -- tests -----------------------------------------------------------------------------------


def test_dns_works_and_the_hosts_own_services_do_not_answer():
    me = host_address()
    with host_server() as port, sandbox_ns() as p:
        t = time.monotonic()
        h = attach(p.pid, NetworkPolicy())
        took = time.monotonic() - t
        try:
            assert h.resolv_conf == "nameserver 10.0.2.3\n"
            r = probe(p, h.resolv_conf, ("dns", "deb.debian.org", 0), ("tcp", "10.0.2.2", port),
                      ("tcp", me, port), ("tcp", "127.0.0.1", port),
                      ("tcp", "10.255.255.53", 53))  # fmt: skip
        finally:
            h.close()
        print(f"attach: {took * 1000:.1f} ms")
        assert isinstance(r["dns:deb.debian.org:0"], list) and r["dns:deb.debian.org:0"], r
        assert not reached(r, "10.0.2.2", port)  # the host's 127.0.0.1 through slirp's gateway
        assert not reached(r, me, port)  # the host's eth0 address
        assert r[f"tcp:127.0.0.1:{port}"] == "error: Connection refused"  # its own loopback
        assert r["tcp:10.255.255.53:53"].startswith("error")  # a private range, DNS server or not
        # The control: the same helper without the rules reaches the host's address.
        with sandbox_ns() as q:
            bare = subprocess.Popen(["slirp4netns", "--configure", "--disable-host-loopback",
                                     str(q.pid), "tap0"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                deadline = time.monotonic() + 10
                while not any(
                    line.split()[1:2] == ["00000000"]
                    for line in Path(f"/proc/{q.pid}/net/route").read_text().splitlines()[1:]
                ):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                assert reached(probe(q, "", ("tcp", me, port)), me, port)
            finally:
                bare.kill()
                bare.wait()


def test_a_private_range_server_needs_the_allow_list_and_block_wins():
    with server_netns("10.213.7.1", "10.213.7.2", 30) as (addr, port, _ns):
        cases = [(NetworkPolicy(), False),
                 (NetworkPolicy(allow=(addr,)), True),
                 (NetworkPolicy(allow=("10.213.0.0/16",), block=(f"{addr}/32",)), False),
                 (NetworkPolicy("deny", allow=("10.213.7.0/30",)), True)]  # fmt: skip
        for policy, expect in cases:
            with sandbox_ns() as p, attach(p.pid, policy) as h:
                r = probe(p, h.resolv_conf, ("tcp", addr, port))
                assert reached(r, addr, port) is expect, (policy, r)


def test_allow_and_deny_modes_and_the_block_list_on_a_public_address():
    with server_netns("198.51.100.1", "198.51.100.2", 30) as (addr, port, _ns):
        cases = [(NetworkPolicy(), True),
                 (NetworkPolicy(block=("198.51.100.0/24",)), False),
                 (NetworkPolicy("deny"), False),
                 (NetworkPolicy("deny", allow=(addr,)), True),
                 (NetworkPolicy("deny", allow=(addr,), block=(addr,)), False)]  # fmt: skip
        for policy, expect in cases:
            with sandbox_ns() as p, attach(p.pid, policy) as h:
                r = probe(p, h.resolv_conf, ("tcp", addr, port), ("dns", "deb.debian.org", 0))
                assert reached(r, addr, port) is expect, (policy, r)
                assert isinstance(r["dns:deb.debian.org:0"], list), r  # DNS in every mode


def test_rules_hold_against_a_process_without_net_admin_and_bind_it_with():
    with server_netns("198.51.100.5", "198.51.100.6", 30) as (addr, port, _ns):
        with sandbox_ns() as p, attach(p.pid, NetworkPolicy("deny")) as h:
            lift = subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", "setpriv",
                                   "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--",
                                   "nft", "flush", "ruleset"], capture_output=True, text=True)  # fmt: skip
            assert lift.returncode != 0 and "Operation not permitted" in lift.stderr
            assert not reached(probe(p, h.resolv_conf, ("tcp", addr, port)), addr, port)
            # What the rules are worth hangs on that capability: with it, they go.
            subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", "nft", "flush",
                            "ruleset"], check=True)  # fmt: skip
            assert reached(probe(p, h.resolv_conf, ("tcp", addr, port)), addr, port)


def test_refresh_swaps_what_names_resolve_to(monkeypatch):
    with server_netns("198.51.100.9", "198.51.100.10", 30) as (addr, port, _ns):
        answers = {"svc.example": "192.0.2.200"}
        real = socket.getaddrinfo

        def fake(host, *a, **kw):  # the name's DNS answer changes between attach and refresh
            if host in answers:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]
            return real(host, *a, **kw)

        monkeypatch.setattr(socket, "getaddrinfo", fake)
        with (
            sandbox_ns() as p,
            attach(p.pid, NetworkPolicy(block=("svc.example", "x.invalid"))) as h,
        ):
            assert h.unresolved == ["x.invalid"]
            assert reached(probe(p, h.resolv_conf, ("tcp", addr, port)), addr, port)
            answers["svc.example"] = addr
            assert h.refresh() == ["x.invalid"]
            assert not reached(probe(p, h.resolv_conf, ("tcp", addr, port)), addr, port)
            listed = subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", "nft", "list",
                                     "set", "inet", "tlimage", "block4"], capture_output=True,
                                    text=True, check=True).stdout  # fmt: skip
            assert addr in listed and "192.0.2.200" not in listed


def test_mode_none_is_loopback_only_without_a_helper():
    code = ("import socket,fcntl,struct,json;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "f=struct.unpack('16sH14x',fcntl.ioctl(s,0x8913,struct.pack('16sH14x',b'lo',0)))[1];"
            "print(json.dumps([[n for _,n in socket.if_nameindex()],f&1]))")  # fmt: skip
    with sandbox_ns() as p:
        h = attach(p.pid, NetworkPolicy("none"))
        assert h.pid is None
        out = subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", sys.executable, "-c",
                              code], capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert json.loads(out) == [["lo"], 1]
        h.close()


def test_no_helper_outlives_its_sandbox():
    before = set(helpers())
    # close(): the helper is killed and reaped; a second close is a no-op
    with sandbox_ns() as p:
        h = attach(p.pid, NetworkPolicy())
        assert h.alive() and h.pid in helpers()
        h.close()
        h.close()
        assert not h.alive() and h.pid not in helpers()
    # exit_fd: the sandbox holds the write end; the helper ends with the sandbox alone
    r, w = os.pipe()
    with sandbox_ns(pass_fds=(w,)) as p:
        os.close(w)
        h = attach(p.pid, NetworkPolicy(), exit_fd=r)
        os.close(r)
        rec = h.record()
        h._proc = None  # forget it as a child: as if the process that attached had gone
    deadline = time.monotonic() + 5
    while rec["pid"] in helpers():
        assert time.monotonic() < deadline, "the helper outlived its sandbox"
        time.sleep(0.02)
    # adopt(): a later process ends a helper it did not start
    r, w = os.pipe()
    with sandbox_ns(pass_fds=(w,)) as p:
        h = attach(p.pid, NetworkPolicy("deny"), exit_fd=r)
        os.close(r)
        again = network.NetHandle.adopt(json.loads(json.dumps(h.record())))
        assert again.alive() and again.policy == NetworkPolicy("deny")
        again.close()
        deadline = time.monotonic() + 5
        while h.pid in helpers():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.close(w)
        h.close()
    assert set(helpers()) <= before


def test_attach_latency():
    """Prints the median attach time (allow mode: lo, rules, helper ready)."""
    times = []
    for _ in range(10):
        with sandbox_ns() as p:
            t = time.monotonic()
            h = attach(p.pid, NetworkPolicy())
            times.append(time.monotonic() - t)
            h.close()
    times.sort()
    print(f"attach median {times[5] * 1000:.1f} ms, min {times[0] * 1000:.1f} ms")
    assert times[5] < 1.0


RAW_SEND = r"""
import socket, struct, sys
dst, port = sys.argv[1], int(sys.argv[2])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
payload = b"raw-frame"
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload  # no UDP checksum
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton("10.0.2.100"), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex("52550a000202" "020000000001" "0800") + ip + udp  # to slirp's gateway MAC
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
out = []
for bypass in (0, 1):  # through the queueing layer, and PACKET_QDISC_BYPASS straight to the driver
    s.setsockopt(263, 20, bypass)
    try:
        s.send(frame)
        out.append("sent")
    except OSError as e:
        out.append(e.strerror)
print(",".join(out))
"""

UDP_SERVE = (r"import socket,sys;u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
             r"u.bind((sys.argv[1],0));u.settimeout(3);print(u.getsockname()[1],flush=True)" "\n"
             r"n=0" "\n" r"try:" "\n" r" while True: u.recv(64); n+=1" "\n"
             r"except OSError: print(n,flush=True)")  # fmt: skip


def udp_listener(netns: str | None, addr: str) -> tuple[subprocess.Popen, int]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    srv = subprocess.Popen([*pre, sys.executable, "-c", UDP_SERVE, addr], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    return srv, int(srv.stdout.readline())


def test_raw_frames_of_a_process_with_net_raw_meet_the_same_rules():
    """CAP_NET_RAW (in Docker's default set) lets a process write frames to the tap device with
    an AF_PACKET socket, past every inet hook: the device's egress rules must stop them too."""
    me = host_address()
    with server_netns("198.51.100.13", "198.51.100.14", 30) as (public, _port, name):
        for policy in (NetworkPolicy(), NetworkPolicy(block=(public,))):
            with sandbox_ns() as p, attach(p.pid, policy):
                host_srv, host_port = udp_listener(None, me)
                far_srv, far_port = udp_listener(name, public)
                sends = []
                for dst, port in ((me, host_port), (public, far_port)):
                    r = subprocess.run(["nsenter", f"--net=/proc/{p.pid}/ns/net", "setpriv",
                                        "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                                        "--", sys.executable, "-c", RAW_SEND, dst, str(port)],
                                       capture_output=True, text=True)  # fmt: skip
                    assert r.returncode == 0, r.stderr
                    sends.append(r.stdout.strip())
                host_got = int(host_srv.communicate(timeout=10)[0].strip())
                far_got = int(far_srv.communicate(timeout=10)[0].strip())
                assert host_got == 0, f"the host's address got {host_got} raw frames ({sends})"
                # the control: the same frames reach a destination the policy allows
                assert far_got == (0 if policy.block else 2), (policy, far_got, sends)


def test_attach_leaves_the_hosts_mounts_alone():
    """slirp4netns --enable-sandbox detaches its old root; that must not propagate to the host's
    shared mounts (each `ip netns` name is one: they would be unmounted)."""

    def mounts() -> set[str]:
        return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}

    name = f"tlnet{os.getpid()}-keep"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        before = mounts()
        assert f"/run/netns/{name}" in before
        with sandbox_ns() as p, attach(p.pid, NetworkPolicy()):
            pass
        assert mounts() >= before
        subprocess.run(["ip", "netns", "exec", name, "true"], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
