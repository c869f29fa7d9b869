"""ADD <url>: download to a file named after the URL, verified against a checksum if given."""

from __future__ import annotations

import hashlib
import posixpath
import urllib.parse
import urllib.request
from pathlib import Path

from tlimage.errors import TlimageError

TIMEOUT_S = 60


def fetch_url(url: str, folder: Path, checksum: str | None = None) -> Path:
    name = posixpath.basename(urllib.parse.urlsplit(url).path) or "download"
    dest = folder / name
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as out:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise TlimageError(f"ADD {url}: download failed: {e}") from None
    if checksum:
        algo, _, want = checksum.partition(":")
        if algo != "sha256" or not want:
            raise TlimageError(f"ADD --checksum {checksum!r}: expected sha256:<hex>")
        if h.hexdigest() != want.lower():
            raise TlimageError(
                f"ADD {url}: checksum mismatch: expected sha256:{want}, got sha256:{h.hexdigest()}"
            )
    dest.chmod(0o600)
    return dest
