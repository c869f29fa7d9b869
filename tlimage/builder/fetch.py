"""ADD <url>: downloads kept in the cache by URL, revalidated with HTTP validators.

What BuildKit does, and users rely on:
- the step's cache key covers the downloaded *content* (its sha256), not only the URL: a file
  that changed on the server rebuilds the step, an unchanged one stays CACHED;
- a download is revalidated with a conditional GET (`If-None-Match` with the ETag,
  `If-Modified-Since` with Last-Modified) so an unchanged file is not downloaded again; a 304
  reuses the kept copy;
- `--checksum sha256:<hex>` is verified; when the kept copy already has that digest no request is
  made at all;
- the file keeps the URL's last path component as its name and is never unpacked (the builder
  writes it with mode 0600).

Downloads live in the `_layout.DOWNLOADS` bucket, `<cache>/layers-v1/downloads/<sha256 of the
URL>/` (the body named by its sha256, and `meta.json`; each written to a temp file and renamed,
so an interrupted download leaves the old copy whole). `prune` evicts them like the other
derived buckets, least recently used first (a reuse touches the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tlimage import _layout
from tlimage._fs import write_atomic
from tlimage.errors import BuildError

TIMEOUT_S = 60
_CHUNK = 1 << 20


class FetchError(BuildError):
    """An ADD URL could not be fetched (or did not match its checksum)."""


@dataclass(frozen=True)
class Download:
    path: Path  # the kept body
    name: str  # the file name it gets in the image
    digest: str  # sha256:<hex>
    url: str = ""


def url_name(url: str) -> str:
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    return urllib.parse.unquote(name) if name not in ("", ".", "..") else "download"


def parse_checksum(checksum: str) -> str:
    algo, _, want = checksum.partition(":")
    want = want.lower()
    if algo != "sha256" or len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise FetchError(f"ADD --checksum {checksum!r}: expected sha256:<64 hex digits>")
    return want


def fetch(url: str, cache_root: Path, checksum: str | None = None) -> Download:
    """The content of `url`, from the kept copy when the server says it has not changed (or
    when it already has the checksum asked for), else downloaded anew. `cache_root` is the
    cache's root folder."""
    want = parse_checksum(checksum) if checksum else None
    folder = _layout.DOWNLOADS.under(cache_root) / hashlib.sha256(url.encode()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # used now: prune evicts the least recently used first
    meta_path = folder / "meta.json"
    meta = _read_meta(meta_path)
    # Bodies are named by their digest, so a key and the bytes it names always agree, even
    # while another build revalidates the same URL.
    body = folder / str(meta.get("sha256", "none"))
    if not body.is_file():
        meta = {}
    name = url_name(url)
    if want and meta.get("sha256") == want:
        return Download(body, name, "sha256:" + want, url)

    req = urllib.request.Request(url, headers={"User-Agent": "tlimage"})
    if meta.get("etag"):
        req.add_header("If-None-Match", meta["etag"])
    if meta.get("last_modified"):
        req.add_header("If-Modified-Since", meta["last_modified"])
    tmp = folder / f".tmp-{os.getpid()}-body"
    try:
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 304 and meta.get("sha256"):
                digest = meta["sha256"]
                _verify(url, want, digest)
                return Download(body, name, "sha256:" + digest, url)
            raise FetchError(f"ADD {url}: download failed: HTTP {e.code} {e.reason}") from None
        h = hashlib.sha256()
        with resp, open(tmp, "wb") as out:
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
            headers = resp.headers
        digest = h.hexdigest()
        _verify(url, want, digest)
        body = folder / digest
        os.replace(tmp, body)
        new_meta = {"url": url, "sha256": digest, "etag": headers.get("ETag"),
                    "last_modified": headers.get("Last-Modified")}  # fmt: skip
        write_atomic(meta_path, json.dumps(new_meta, sort_keys=True).encode())
        return Download(body, name, "sha256:" + digest, url)
    except OSError as e:
        if getattr(e, "errno", None) in (28, 122):  # a full disk: the builder says where
            raise
        reason = getattr(e, "reason", None) or e.strerror or e
        raise FetchError(f"ADD {url}: download failed: {reason}") from None
    except ValueError as e:  # a malformed URL
        raise FetchError(f"ADD {url}: {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _verify(url: str, want: str | None, digest: str) -> None:
    if want and digest != want:
        raise FetchError(f"ADD {url}: checksum mismatch: expected sha256:{want}, got "
                         f"sha256:{digest}")  # fmt: skip


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def fetch_url(url: str, folder: Path, checksum: str | None = None) -> Path:
    """Download `url` into `folder` (no cache; kept for callers outside a build)."""
    d = fetch(url, folder / ".cache", checksum)
    dest = folder / d.name
    with open(d.path, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
    dest.chmod(0o600)
    return dest
