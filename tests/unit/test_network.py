"""The sandbox network's pure parts: policy validation, the host's addresses, the nft script
(checked by nft itself in a throwaway namespace when nft and root are there)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tlimage.errors import NetworkError
from tlimage.sandbox import network
from tlimage.sandbox.network import NetworkPolicy, ruleset


def test_policy_defaults_to_internet():
    p = NetworkPolicy()
    assert (p.mode, p.block, p.allow) == ("allow", (), ())
    assert NetworkPolicy.from_json(p.to_json()) == p


@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "open"}, "network mode 'open' is not one of allow, deny, none"),
    ({"block": "10.0.0.0/8"}, "must be a list of entries, not the string"),
    ({"block": ("10.0.0.0/33",)}, "block entry '10.0.0.0/33' is neither"),
    ({"allow": ("exa mple.com",)}, "allow entry 'exa mple.com' is neither"),
    ({"allow": ("1.2.3",)}, "allow entry '1.2.3' is neither"),
    ({"allow": ("",)}, "allow entry '' is empty"),
    ({"mode": "none", "allow": ("1.1.1.1",)}, "takes no --allow or --block"),
])  # fmt: skip
def test_policy_errors_name_the_entry(kwargs, needle):
    with pytest.raises(NetworkError) as e:
        NetworkPolicy(**kwargs)
    assert needle in str(e.value)


def test_policy_accepts_cidrs_addresses_and_names():
    p = NetworkPolicy(
        "deny",
        block=["192.0.2.7"],
        allow=("10.1.0.0/16", "2001:db8::/32", "deb.debian.org", "localhost."),
    )
    assert p.block == ("192.0.2.7",)  # lists become tuples: the policy stays hashable
    hash(p)


def test_resolve_splits_families_and_reports_unknown_names():
    v4, v6, missing = network._resolve(("10.1.2.3", "2001:db8::/64", "localhost",
                                        "no-such-host.invalid"), "allow")  # fmt: skip
    assert "10.1.2.3/32" in v4 and "127.0.0.1/32" in v4
    assert "2001:db8::/64" in v6
    assert missing == ["no-such-host.invalid"]


def test_host_addresses_cover_loopback_and_slirps_gateway():
    v4, v6 = network.host_addresses()
    assert "127.0.0.0/8" in v4 and network.SLIRP_NET in v4 and "::1/128" in v6


def test_ruleset_orders_host_block_allow_private():
    text = ruleset(NetworkPolicy("deny"), ["127.0.0.0/8"], ["::1/128"], (["1.2.3.4/32"], []),
                   (["10.9.0.0/16"], []))  # fmt: skip
    order = [text.index(s) for s in ("udp dport 53 accept", "@host4", "@block4", "@allow4",
                                     "@private4", "    goto refuse\n  }")]  # fmt: skip
    assert order == sorted(order)
    assert "policy drop" in text and "elements = { 1.2.3.4/32 }" in text
    allow = ruleset(NetworkPolicy("allow"), [], [], ([], []), ([], []))
    assert "policy accept" in allow and "    goto refuse\n  }" not in allow
    assert "chain forward {\n    type filter hook forward priority 0; policy drop;" in allow


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft", path=network.TOOL_PATH) is None,
    reason="checking the script needs root and nft (apt-get install nftables)",
)
def test_nft_accepts_the_ruleset():
    h4, h6 = network.host_addresses()
    for mode in ("allow", "deny"):
        text = ruleset(NetworkPolicy(mode), h4 + ["10.0.2.2/32"], h6, (["1.2.3.0/24"],
                       ["2001:db8::/32"]), (["10.9.0.0/16"], ["fd00:1::/64"]))  # fmt: skip
        proc = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=text.encode(),
                              capture_output=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()


def test_attach_refuses_the_hosts_own_namespace():
    if os.geteuid() != 0:
        pytest.skip("opening another process's namespace needs root")
    with pytest.raises(NetworkError, match="shares the host's network namespace"):
        network.attach(os.getpid(), NetworkPolicy("none"))
    with pytest.raises(NetworkError, match="cannot open the network namespace of pid"):
        network.attach(2**22 + 5, NetworkPolicy("none"))
