"""Private networking for a sandbox that already has its own, fresh network namespace.

    handle = attach(pid, NetworkPolicy("allow", block=("10.1.2.0/24", "example.com")))
    ... write handle.resolv_conf to the sandbox's /etc/resolv.conf ...
    handle.close()                       # idempotent; the helper is gone afterwards

`attach` brings `lo` up in the namespace of `pid` and, unless the mode is "none", starts
slirp4netns (a user-mode TCP/IP stack, Debian's `slirp4netns`) on a tap device in it, after
writing nftables rules into that namespace from the host side. The rules live in the sandbox's
namespace but are written by the host, so a process inside without CAP_NET_ADMIN cannot lift
them. They drop, in this order:

1. everything of the host: its loopback (slirp's 10.0.2.2), every address of its interfaces
   (read at attach), and slirp's own network except the DNS forwarder 10.0.2.3:53 (which
   forwards to the host's resolver, even when that one is on a private range);
2. the policy's `block` list (CIDRs, or host names resolved at attach and by `refresh()`);
3. then accept the policy's `allow` list (which may open a private range, never the host);
4. private, shared, link-local, multicast and reserved ranges (RFC 1918, 100.64/10,
   169.254/16, fc00::/7, fe80::/10, ...);
5. the rest: accepted in mode "allow", dropped in mode "deny".

Forwarding through the namespace is dropped. A refused packet of the sandbox's own fails its
connect or send at once (ICMP admin-prohibited: EHOSTUNREACH), so nothing waits for a time-out.
The same sets guard the tap device's egress hook (a netdev table): a process with CAP_NET_RAW
can write frames straight to the device with an AF_PACKET socket, which no inet hook sees. The
tap device is made (persistent) before the rules and the helper, so it is never unguarded.

slirp4netns, not pasta (passt), because in Debian 12 it starts faster here (median 3.5 ms to
ready vs 14 ms, `bench` in the commit) and works as root against a root-owned namespace as is
(pasta drops to `nobody` and cannot open /proc/PID/ns/net), its DNS forwarder needs no host
address, and it forwards no port unless asked (pasta forwards the host's bound ports into the
namespace by default). It runs with `--disable-host-loopback --enable-seccomp --enable-sandbox`.

Lifetime: slirp4netns ends when its exit fd reports hang-up. By default the handle holds the
other end (the helper ends with the process that attached, or on `close()`); a long-lived
sandbox passes `exit_fd=` the read end of a pipe whose write end its PID 1 holds, so the helper
ends with the sandbox even when no tlimage process is left. `NetHandle.record()` is what a
runtime stores, `NetHandle.adopt(record)` takes the helper back later (to refresh or close).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tlimage.errors import NetworkError

MODES = ("allow", "deny", "none")
TABLE = "tlimage"
TAP = "tap0"
SLIRP_NET = "10.0.2.0/24"
SLIRP_GATEWAY = "10.0.2.2"  # the host's loopback, as slirp4netns offers it
SLIRP_DNS = "10.0.2.3"
READY_TIMEOUT = 10.0
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
TUNSETIFF, TUNSETPERSIST, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x400454CB, 0x0002, 0x1000

# Never reachable unless the allow list names them: private, shared, link-local, multicast,
# reserved and documentation-free special ranges (IANA special-purpose registries).
PRIVATE4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)  # fmt: skip
PRIVATE6 = (
    "::/127", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "fc00::/7",
    "fe80::/10", "ff00::/8",
)  # fmt: skip

_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


# -- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkPolicy:
    """What a sandbox may reach. `mode`: "allow" (internet, the default), "deny" (no internet;
    DNS and the `allow` list only) or "none" (loopback only, no helper). `block` and `allow` hold
    CIDRs (`10.1.0.0/16`, `2001:db8::/32`), addresses or host names; block wins over allow."""

    mode: str = "allow"
    block: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NetworkError(f"network mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("block", "allow"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise NetworkError(f"network {name} list must be a list of entries, not the "
                                   f"string {value!r}")  # fmt: skip
            object.__setattr__(self, name, tuple(value))
            for entry in value:
                _parse_entry(entry, name)
        if self.mode == "none" and (self.block or self.allow):
            raise NetworkError("network mode 'none' takes no --allow or --block entries "
                               "(the sandbox has loopback only)")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "block": list(self.block), "allow": list(self.allow)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkPolicy:
        return cls(data.get("mode", "allow"), tuple(data.get("block", ())),
                   tuple(data.get("allow", ())))  # fmt: skip


def _parse_entry(entry: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A network for a CIDR or address, the name itself for a host name."""
    if not isinstance(entry, str) or not entry.strip():
        raise NetworkError(f"network {where} entry {entry!r} is empty or not a string")
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if "/" in text or ":" in text or not _HOST_RE.match(text) or text.replace(".", "").isdigit():
        raise NetworkError(f"network {where} entry {entry!r} is neither a CIDR, an address nor "
                           "a host name")  # fmt: skip
    return text.rstrip(".")


def _resolve(entries: tuple[str, ...], where: str) -> tuple[list[str], list[str], list[str]]:
    """(IPv4 CIDRs, IPv6 CIDRs, names that did not resolve) for a block or allow list."""
    v4: list[str] = []
    v6: list[str] = []
    missing: list[str] = []
    for entry in entries:
        parsed = _parse_entry(entry, where)
        if not isinstance(parsed, str):
            (v4 if parsed.version == 4 else v6).append(str(parsed))
            continue
        try:
            infos = socket.getaddrinfo(parsed, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            missing.append(parsed)
            continue
        for family, *_rest, addr in infos:
            if family == socket.AF_INET:
                v4.append(f"{addr[0]}/32")
            elif family == socket.AF_INET6:
                v6.append(f"{addr[0].split('%')[0]}/128")
    return sorted(set(v4)), sorted(set(v6)), missing


# -- what the host has ---------------------------------------------------------------------


def host_addresses() -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) CIDRs of the host itself: every local address of its interfaces, its
    loopback ranges and slirp's network (whose gateway is the host), read from the calling
    process's network namespace (the host's)."""
    v4: set[str] = {"127.0.0.0/8", SLIRP_NET}
    v6: set[str] = {"::1/128"}
    with contextlib.suppress(OSError):  # local addresses: the "/32 host LOCAL" leaves
        last = None
        for line in open("/proc/self/net/fib_trie", encoding="ascii"):
            s = line.strip()
            if s.startswith(("|--", "+--")):
                last = s.split()[1]
            elif s.startswith("/32 host LOCAL") and last:
                v4.add(f"{last}/32")
    with contextlib.suppress(OSError):
        for line in open("/proc/self/net/if_inet6", encoding="ascii"):
            f = line.split()
            if f:
                v6.add(f"{ipaddress.IPv6Address(int(f[0], 16))}/128")
    return sorted(v4), sorted(v6)


# -- the rules -----------------------------------------------------------------------------


def _set(name: str, kind: str, elements: list[str]) -> str:
    elems = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    return f"  set {name} {{ type {kind}; flags interval; auto-merge;{elems} }}\n"


def ruleset(policy: NetworkPolicy, host4: list[str], host6: list[str],
            block: tuple[list[str], list[str]], allow: tuple[list[str], list[str]]) -> str:  # fmt: skip
    """The nft script for a sandbox's fresh namespace (one transaction: all or nothing): the
    inet table refuses what sockets send, the netdev table's egress hook on the tap device drops
    the same frames when a process writes them to the device itself (an AF_PACKET socket, which
    CAP_NET_RAW allows, never passes the inet hooks)."""
    final = "accept" if policy.mode == "allow" else "drop"
    sets = (_set("host4", "ipv4_addr", host4) + _set("host6", "ipv6_addr", host6)
            + _set("block4", "ipv4_addr", block[0]) + _set("block6", "ipv6_addr", block[1])
            + _set("allow4", "ipv4_addr", allow[0]) + _set("allow6", "ipv6_addr", allow[1])
            + _set("private4", "ipv4_addr", list(PRIVATE4))
            + _set("private6", "ipv6_addr", list(PRIVATE6)))  # fmt: skip
    dns = (f"    ip daddr {SLIRP_DNS} udp dport 53 accept\n"
           f"    ip daddr {SLIRP_DNS} tcp dport 53 accept\n")  # fmt: skip

    def checks(refuse: str) -> str:
        return (
            f"    ip daddr @host4 {refuse}\n    ip6 daddr @host6 {refuse}\n"
            f"    ip daddr @block4 {refuse}\n    ip6 daddr @block6 {refuse}\n"
            "    ip daddr @allow4 accept\n    ip6 daddr @allow6 accept\n"
            f"    ip daddr @private4 {refuse}\n    ip6 daddr @private6 {refuse}\n"
        )

    return (
        f"table inet {TABLE} {{\n" + sets + "  chain output {\n"
        f"    type filter hook output priority 0; policy {final};\n"
        '    oifname "lo" accept\n'
        + dns
        + checks("goto refuse")
        + ("" if policy.mode == "allow" else "    goto refuse\n")
        + "  }\n"
        "  chain refuse {\n    reject with icmpx type admin-prohibited\n  }\n"
        "  chain forward {\n    type filter hook forward priority 0; policy drop;\n  }\n"
        "}\n"
        f"table netdev {TABLE} {{\n" + sets + "  chain egress {\n"
        f'    type filter hook egress device "{TAP}" priority 0; policy drop;\n'
        "    ether type arp accept\n" + dns + checks("drop") + f"    ether type ip {final}\n"
        "  }\n"
        "}\n"
    )


def _set_update(block: tuple[list[str], list[str]], allow: tuple[list[str], list[str]]) -> str:
    out = []
    for family in ("inet", "netdev"):
        for name, elems in (("block4", block[0]), ("block6", block[1]), ("allow4", allow[0]),
                            ("allow6", allow[1])):  # fmt: skip
            out.append(f"flush set {family} {TABLE} {name}\n")
            if elems:
                out.append(f"add element {family} {TABLE} {name} {{ {', '.join(elems)} }}\n")
    return "".join(out)


# -- namespace plumbing --------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise NetworkError(f"`{name}` is not installed; a sandbox's private network needs it",
                           hint=f"apt-get install -y {package}")  # fmt: skip
    return path


def check_host(mode: str = "allow") -> str | None:
    """None when this host can give a sandbox the network of `mode`, else what is missing."""
    if mode == "none":
        return None
    for name, package in (("slirp4netns", "slirp4netns"), ("nft", "nftables"),
                          ("nsenter", "util-linux")):  # fmt: skip
        if shutil.which(name, path=TOOL_PATH) is None:
            return f"`{name}` is not installed (apt-get install {package})"
    return None


def _netns_fd(pid: int) -> int:
    """An fd on the network namespace of `pid`, refused when that is the caller's own (rules
    meant for a sandbox must never land on the host)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(
            f"cannot open the network namespace of pid {pid}: {e.strerror}"
        ) from None
    if os.fstat(fd).st_ino in (_ino("/proc/self/ns/net"), _ino("/proc/1/ns/net")):
        os.close(fd)
        raise NetworkError(f"pid {pid} shares the host's network namespace; a sandbox network "
                           "is attached only to a fresh one (unshare --net)")  # fmt: skip
    return fd


def _ino(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def _in_netns(fd: int, fn) -> Any:  # noqa: ANN001 - a callable run in the namespace
    """Run `fn()` on a thread that joined the namespace of `fd` (setns moves one thread only)."""
    box: dict[str, Any] = {}

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            box["error"] = OSError(ctypes.get_errno(), "setns")
            return
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="tlimage-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _loopback_up() -> None:
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def _make_tap() -> None:
    """A persistent tap device TAP (slirp4netns attaches to it), so the egress rules can be on
    it before the helper starts: no moment where the device exists unguarded."""
    import fcntl

    with open("/dev/net/tun", "r+b", buffering=0) as tun:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(tun, TUNSETPERSIST, 1)


def _nft(fd: int, script: str) -> None:
    """Load `script` into the namespace of `fd` (nft runs there under nsenter, from the host)."""
    nsenter, nft = _tool("nsenter", "util-linux"), _tool("nft", "nftables")
    proc = subprocess.run([nsenter, f"--net=/proc/self/fd/{fd}", "--", nft, "-f", "-"],
                          input=script.encode(), capture_output=True, pass_fds=(fd,),
                          env={"PATH": TOOL_PATH})  # fmt: skip
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise NetworkError("cannot load the sandbox's firewall rules: "
                           + (msg[0] if msg else f"nft exited {proc.returncode}"),
                           hint="the kernel needs nf_tables (modprobe nf_tables)")  # fmt: skip


def _start_time(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


# -- the handle ----------------------------------------------------------------------------


@dataclass
class NetHandle:
    """A sandbox's network: `pid` is the helper's (None in mode "none"), `resolv_conf` the text
    for the sandbox's /etc/resolv.conf. `close()` ends the helper (idempotent)."""

    pid: int | None
    target: int
    netns: int  # inode of the sandbox's network namespace
    policy: NetworkPolicy
    resolv_conf: str
    started: int | None = None  # the helper's start time (clock ticks after boot)
    unresolved: list[str] = field(default_factory=list)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _exit_w: int = field(default=-1, repr=False)
    _closed: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        """Whether the helper (the same process that attach started) still runs."""
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return self.started is not None and _start_time(self.pid) == self.started

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pid is not None and self.alive():
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(self.pid)
                try:
                    if self._proc is not None or _start_time(self.pid) == self.started:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        if self._proc is not None:
            # Popen.wait(timeout) polls with sleeps (tens of ms per step); a pidfd wakes at once.
            with contextlib.suppress(OSError):
                import select

                pidfd = os.pidfd_open(self._proc.pid)
                try:
                    select.select([pidfd], [], [], 5)
                finally:
                    os.close(pidfd)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0 if self._proc.poll() is None else None)

    def refresh(self) -> list[str]:
        """Resolve the policy's host names again and swap the block and allow sets at once
        (one nft transaction). Returns the names that did not resolve."""
        if self.policy.mode == "none":
            return []
        fd = _netns_fd(self.target)
        try:
            if os.fstat(fd).st_ino != self.netns:
                raise NetworkError(f"pid {self.target} is no longer in the sandbox's network "
                                   "namespace (the sandbox ended)")  # fmt: skip
            b4, b6, bm = _resolve(self.policy.block, "block")
            a4, a6, am = _resolve(self.policy.allow, "allow")
            _nft(fd, _set_update((b4, b6), (a4, a6)))
        finally:
            os.close(fd)
        self.unresolved = bm + am
        return self.unresolved

    def record(self) -> dict[str, Any]:
        """What a runtime stores to `adopt` the helper later."""
        return {"pid": self.pid, "started": self.started, "target": self.target,
                "netns": self.netns, "policy": self.policy.to_json(),
                "resolv_conf": self.resolv_conf}  # fmt: skip

    @classmethod
    def adopt(cls, record: dict[str, Any]) -> NetHandle:
        """The handle of a helper another process started (from `record()`). A helper that
        has ended, or a pid now used by another process, gives a handle whose close() does
        nothing."""
        return cls(pid=record.get("pid"), target=record["target"], netns=record["netns"],
                   policy=NetworkPolicy.from_json(record.get("policy") or {}),
                   resolv_conf=record.get("resolv_conf", ""),
                   started=record.get("started"))  # fmt: skip

    def __enter__(self) -> NetHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(pid: int, policy: NetworkPolicy | None = None, *, exit_fd: int | None = None,
           log_path: str | None = None) -> NetHandle:  # fmt: skip
    """Give the (fresh) network namespace of `pid` its network under `policy`. `exit_fd`, when
    given, is the read end of a pipe whose write end the sandbox holds: the helper ends when
    it closes (else the returned handle holds it). `log_path` receives the helper's output."""
    policy = policy or NetworkPolicy()
    fd = _netns_fd(pid)
    try:
        ino = os.fstat(fd).st_ino
        try:
            _in_netns(fd, _loopback_up)
        except OSError as e:
            raise NetworkError(
                f"cannot bring up loopback in the sandbox: {e.strerror or e}"
            ) from None
        if policy.mode == "none":
            return NetHandle(None, pid, ino, policy, "# no network (loopback only)\n")
        slirp = _tool("slirp4netns", "slirp4netns")
        try:
            _in_netns(fd, _make_tap)
        except OSError as e:
            raise NetworkError(
                f"cannot make the sandbox's tap device: {e.strerror or e}",
                hint="the kernel needs tun (modprobe tun)",
            ) from None
        host4, host6 = host_addresses()
        b4, b6, bm = _resolve(policy.block, "block")
        a4, a6, am = _resolve(policy.allow, "allow")
        _nft(fd, ruleset(policy, host4, host6, (b4, b6), (a4, a6)))
        return _start_slirp(slirp, fd, pid, ino, policy, exit_fd, log_path, bm + am)
    finally:
        os.close(fd)


def _start_slirp(slirp: str, fd: int, pid: int, ino: int, policy: NetworkPolicy,
                 exit_fd: int | None, log_path: str | None, unresolved: list[str]) -> NetHandle:  # fmt: skip
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    own_w = -1
    if exit_fd is None:
        exit_fd, own_w = os.pipe2(os.O_CLOEXEC)
        close_exit_r = True
    else:
        close_exit_r = False
    log = open(log_path, "ab") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
    # --enable-sandbox pivots slirp4netns into an empty root and detaches the old one; 1.2.0
    # makes only "/" private first, so the detach would propagate to the host's shared mounts
    # (it unmounts every /run/netns/NAME): it runs in a mount namespace of its own, all private.
    cmd = [_tool("unshare", "util-linux"), "--mount", "--propagation", "private", "--", slirp,
           "--configure", "--disable-host-loopback", "--enable-seccomp",
           "--enable-sandbox", "--mtu=65520", f"--ready-fd={ready_w}", f"--exit-fd={exit_fd}",
           "--netns-type=path", f"/proc/self/fd/{fd}", TAP]  # fmt: skip
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(fd, ready_w, exit_fd), start_new_session=True,
                                env={"PATH": TOOL_PATH})  # fmt: skip
    except OSError as e:
        for x in (ready_r, ready_w, own_w):
            if x >= 0:
                os.close(x)
        if close_exit_r:
            os.close(exit_fd)
        log.close()
        raise NetworkError(f"cannot start slirp4netns: {e.strerror}") from None
    os.close(ready_w)
    if close_exit_r:
        os.close(exit_fd)
    ok = False
    try:
        ready = _wait_ready(ready_r, proc)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            log.seek(0) if not log_path else None
            text = "" if log_path else log.read().decode(errors="replace")
            lines = [x for x in text.splitlines() if x.strip() and "WARNING" not in x]
            raise NetworkError("the sandbox's network helper (slirp4netns) did not come up"
                               + (f": {lines[-1]}" if lines else ""))  # fmt: skip
        ok = True
    finally:
        os.close(ready_r)
        log.close()
        if not ok and own_w >= 0:
            os.close(own_w)
    return NetHandle(proc.pid, pid, ino, policy, f"nameserver {SLIRP_DNS}\n",
                     _start_time(proc.pid), unresolved, proc, own_w)  # fmt: skip


def _wait_ready(fd: int, proc: subprocess.Popen) -> bool:
    import select

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            return os.read(fd, 1) == b"1"
        if proc.poll() is not None:
            return False


__all__ = ["MODES", "NetHandle", "NetworkPolicy", "attach", "check_host", "host_addresses",
           "ruleset"]  # fmt: skip
