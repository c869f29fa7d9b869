"""What a guest with network must not reach: TCP servers on the host's 127.0.0.1 (QEMU's
user-mode network offers it to the guest as 10.0.2.2) and on the host's own address; and what it
must: DNS and a public web server. The probe is a busybox shell script run in the guest."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def greeting_server(addr: str) -> Iterator[int]:
    """A TCP server on the host at `addr` that greets and hangs up; yields its port."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with c, contextlib.suppress(OSError):
                c.sendall(b"hello from the host\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


@contextlib.contextmanager
def host_servers() -> Iterator[tuple[int, str, int]]:
    """(port on 127.0.0.1, the host's address, port there); skips without the tools."""
    from tlimage.sandbox import network

    if network.check_host() is not None:
        pytest.skip(f"{network.check_host()} (scripts/setup.sh installs it)")
    v4, _ = network.host_addresses()
    me = next((a[:-3] for a in v4 if a.endswith("/32") and not a.startswith("127.")), None)
    if me is None:
        pytest.skip("the host has no address besides loopback")
    with greeting_server("127.0.0.1") as lo_port, greeting_server(me) as my_port:
        # the servers answer on the host itself: what the guest does not reach is blocked
        for addr, port in (("127.0.0.1", lo_port), (me, my_port)):
            with socket.create_connection((addr, port), timeout=3) as c:
                assert c.recv(64) == b"hello from the host\n"
        yield lo_port, me, my_port


def probe_script(lo_port: int, me: str, my_port: int) -> str:
    return (
        f"for t in '10.0.2.2 {lo_port}' '{me} {my_port}'; do "
        "busybox nc -w 5 $t </dev/null | grep -q hello && echo reached $t "
        "|| echo blocked $t; done; "
        "busybox nslookup deb.debian.org >/dev/null 2>&1 && echo dns-ok; "
        r"printf 'HEAD /debian/ HTTP/1.0\r\nHost: deb.debian.org\r\n\r\n' | "
        "busybox nc -w 20 deb.debian.org 80 | grep -q '^HTTP/' && echo internet-ok; "
        "true"
    )


def check_probe(text: str, lo_port: int, me: str, my_port: int) -> None:
    assert f"blocked 10.0.2.2 {lo_port}" in text, text
    assert f"blocked {me} {my_port}" in text, text
    assert "dns-ok" in text and "internet-ok" in text, text  # the network itself works
