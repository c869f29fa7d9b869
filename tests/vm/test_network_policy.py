"""A sandbox's network policy (`tl sbx new --network allow|deny --block --allow`) reaches the
rules written outside it: a server in a test network namespace of the test's own (a public
TEST-NET address behind a veth pair) is reached or not as the policy says, from a namespace
sandbox. The rules themselves are tested in test_network.py; this checks the wiring."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.vm.test_network import server_netns

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("slirp4netns") is None,
        reason="needs root and slirp4netns",
    ),  # fmt: skip
]

IMAGE = """\
from tlimage import Image

image = Image("netpol", base_image="busybox").run("mkdir -p /srv")
"""


@pytest.fixture
def image(tmp_path: Path) -> str:
    from tlimage.builder import build_image

    d = tmp_path
    (d / "image.py").write_text(IMAGE)
    build_image(d / "image.py", isolation="namespace")
    return "netpol:latest"


def reaches(image: str, addr: str, port: int, **kw) -> bool:  # noqa: ANN003
    from tlimage.runtime import Sandbox

    sb = Sandbox.create(image, backend="namespace", memory=64, timeout=120, **kw)
    try:
        r = sb.exec("sh", "-c", f"nc -w 2 {addr} {port} </dev/null; echo done=1")
        assert b"done=1" in r.stdout, r
        return b"hello" in r.stdout
    finally:
        sb.terminate()


def test_the_policy_given_at_creation_is_enforced(image: str) -> None:
    from tlimage.sandbox.network import NetworkPolicy

    with server_netns("198.51.100.5", "198.51.100.6", 30) as (addr, port, _ns):
        assert reaches(image, addr, port)  # the default: internet allowed
        assert not reaches(image, addr, port, network_policy=NetworkPolicy("deny"))
        assert reaches(image, addr, port, network_policy={"mode": "deny", "allow": [addr]})
        assert not reaches(
            image, addr, port, network_policy=NetworkPolicy(block=("198.51.100.4/30",))
        )


def test_a_policy_needs_network_and_a_known_mode(image: str) -> None:
    from tlimage.errors import TlimageError
    from tlimage.runtime import Sandbox

    with pytest.raises(TlimageError, match="without network"):
        Sandbox.create(image, backend="namespace", network=False,
                       network_policy={"mode": "deny"})  # fmt: skip
    with pytest.raises(TlimageError, match="not one of"):
        Sandbox.create(image, backend="namespace", network_policy={"mode": "open"})


def test_the_http_api_takes_the_same_policy(image: str) -> None:
    # POST /v1/sandboxes with `network_policy`, against a real `tl sbx serve`: enforced as
    # Sandbox.create enforces it, and a bad policy is a 400 naming the field.
    from tests.vm.test_http_api import _call, _serve, _stop
    from tlimage.runtime.http import api_token

    proc, url = _serve("127.0.0.1:0")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    server = (host, int(port), api_token())

    def reaches_via_api(addr: str, port: int, policy: dict) -> bool:
        st, sb = _call(server, "POST", "/v1/sandboxes", {"image": image, "memory_mb": 64,
                                                         "network_policy": policy})  # fmt: skip
        assert st == 201, sb
        sid = sb["sandbox_id"]
        try:
            st, r = _call(server, "POST", f"/v1/sandboxes/{sid}/exec",
                          {"cmd": ["sh", "-c", f"nc -w 2 {addr} {port} </dev/null; echo done=1"]})  # fmt: skip
            assert st == 200 and "done=1" in r["stdout"], r
            return "hello" in r["stdout"]
        finally:
            _call(server, "DELETE", f"/v1/sandboxes/{sid}")

    try:
        with server_netns("198.51.100.9", "198.51.100.10", 30) as (addr, port, _ns):
            assert reaches_via_api(addr, port, {"mode": "allow"})
            assert not reaches_via_api(addr, port, {"mode": "deny"})
            assert reaches_via_api(addr, port, {"mode": "deny", "allow": [addr]})
            assert not reaches_via_api(addr, port, {"block": ["198.51.100.8/30"]})
        for policy, says in [({"mode": "open"}, "network_policy.mode must be one of"),
                             ({"block": "10.0.0.0/8"}, "'network_policy.block' must be an array"),
                             ({"allow": ["no/such/thing"]}, "neither a CIDR"),
                             ({"bogus": 1}, "unknown field 'network_policy.bogus'")]:  # fmt: skip
            st, err = _call(server, "POST", "/v1/sandboxes",
                            {"image": image, "network_policy": policy})  # fmt: skip
            assert st == 400 and says in err["error"], (policy, err)
    finally:
        assert "Traceback" not in _stop(proc)
