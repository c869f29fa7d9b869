"""Trusting the host's CA bundle inside build steps.

Where outbound HTTPS passes a TLS-intercepting proxy, a base image's own CA bundle rejects the
proxy's certificates and `pip install` fails. With `host_ca` on, every RUN step gets the host's
bundle as an extra read-only top layer (`/etc/ssl/tlimage-host-ca.pem`) and the usual variables
pointing at it. Neither reaches the image: the layer is a lower (never captured), the variables
are build-time only, and both stay out of cache keys (like proxy settings, they change how bytes
are fetched, not which).

`auto` turns it on when the host itself relies on extra CAs: certificates in
/usr/local/share/ca-certificates, or SSL_CERT_FILE / PIP_CERT / REQUESTS_CA_BUNDLE set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import xxhash

GUEST_PATH = "etc/ssl/tlimage-host-ca.pem"
CA_ENV_VARS = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
               "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")  # fmt: skip
_HOST_VARS = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE")
_DEFAULT_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def host_bundle() -> Path | None:
    for var in _HOST_VARS:
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return _DEFAULT_BUNDLE if _DEFAULT_BUNDLE.is_file() else None


def wanted(mode: str) -> bool:
    if mode == "off":
        return False
    if mode == "on":
        return True
    local = _LOCAL_CAS.is_dir() and any(_LOCAL_CAS.rglob("*.crt"))
    return local or any(os.environ.get(v) for v in _HOST_VARS)


def ca_layer(scratch_root: Path, mode: str) -> Path | None:
    """A lower folder holding the host bundle (made once per bundle content), or None."""
    if not wanted(mode):
        return None
    bundle = host_bundle()
    if bundle is None:
        return None
    data = bundle.read_bytes()
    final = scratch_root / "host-ca" / xxhash.xxh3_128_hexdigest(data)
    if final.is_dir():
        return final
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / GUEST_PATH
    target.parent.mkdir(parents=True)
    for d in (tmp / "etc", tmp / "etc" / "ssl"):
        d.chmod(0o755)
    target.write_bytes(data)
    target.chmod(0o644)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


def step_env() -> dict[str, str]:
    return {var: "/" + GUEST_PATH for var in CA_ENV_VARS}
