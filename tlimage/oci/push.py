"""Push a stored image to a registry.

    stats = push(store, local_image, "registry.example/org/app:1.0")

Layers go as OCI zstd blobs (the store's own bytes) by default, or gzip (`compression="gzip"`)
for old clients. Each blob is first checked with HEAD (present: not sent); a blob this cache
pushed before to another repository of the same registry is cross-mounted
(`POST …/blobs/uploads/?mount=…&from=…`); the rest is uploaded in one PUT or in PATCH chunks
(`chunk_size`). The manifest goes last, once every blob it names is there, so a failed push
never leaves a tag pointing at missing blobs.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage.errors import OCIError
from tlimage.oci import client as cl
from tlimage.oci.layout import Blob, LocalImage, build_manifest
from tlimage.oci.pull import LAYOUT
from tlimage.oci.reference import parse

Progress = Callable[[dict[str, Any]], None]


@dataclass
class PushStats:
    ref: str
    digest: str  # the manifest's
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes: int = 0
    duration: float = 0.0


def push(store: Any, image: LocalImage, ref_text: str, *, config: cl.RegistryConfig | None = None,
         client: cl.RegistryClient | None = None, compression: str = "zstd",
         chunk_size: int | None = None, progress: Progress | None = None, jobs: int = 4,
         cache_root: Path | None = None, extra_blobs: list[Blob] = (),
         media_type: str | None = None, manifest: Blob | None = None) -> PushStats:  # fmt: skip
    """Upload `image` (or a ready `manifest` with its blobs in `extra_blobs`) and tag it."""
    ref = parse(ref_text)
    own = client is None
    client = client or cl.RegistryClient(config)
    t0 = time.monotonic()
    hints = _MountHints(cache_root or Path(store.root) / LAYOUT)
    try:
        with tempfile.TemporaryDirectory(dir=str(store.path), prefix="push-") as tmpd:
            if manifest is None:
                manifest, cfg, layers = build_manifest(store, image, compression, Path(tmpd))
                blobs = [*layers, cfg]
            else:
                blobs = list(extra_blobs)
            ep = client.endpoints(ref, write=True)[0]
            stats = PushStats(ref_text, manifest.digest)
            lock = threading.Lock()

            def send(b: Blob) -> None:
                how = _send_blob(client, ep, ref, b, chunk_size, hints, ref_text)
                with lock:
                    getattr(stats, how).append(b.digest)
                    if how == "uploaded":
                        stats.bytes += b.size
                if progress:
                    progress({"event": "push_blob", "ref": ref_text, "blob": b.digest,
                              "size": b.size, "status": how})  # fmt: skip

            unique = list({b.digest: b for b in blobs}.values())
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(unique))),
                                    thread_name_prefix="tlimage-push") as pool:  # fmt: skip
                for f in [pool.submit(send, b) for b in unique]:
                    f.result()
            selector = ref.tag or manifest.digest
            data = manifest.data or b"".join(manifest.chunks())
            client.put_manifest(ep, selector, data, media_type or cl.OCI_MANIFEST,
                                label=ref_text)  # fmt: skip
            hints.add(ref.registry, ref.repository, [b.digest for b in unique])
    finally:
        if own:
            client.close()
    stats.duration = time.monotonic() - t0
    if progress:
        progress({"event": "push_done", "ref": ref_text, "digest": stats.digest,
                  "uploaded": len(stats.uploaded), "mounted": len(stats.mounted),
                  "existing": len(stats.existing), "bytes": stats.bytes,
                  "duration": round(stats.duration, 3)})  # fmt: skip
    return stats


def _send_blob(client: cl.RegistryClient, ep: cl.Endpoint, ref: Any, b: Blob,
               chunk_size: int | None, hints: _MountHints, label: str) -> str:  # fmt: skip
    if client.blob_exists(ep, b.digest, label=label, push=True):
        return "existing"
    repos = hints.repos(ref.registry, b.digest)
    if b.origin is not None and b.origin.host == ep.host:
        repos.insert(0, b.origin.repository)
    opened = None
    for repo in repos:
        if repo == ep.repository:
            continue
        try:
            opened = client.mount_blob(ep, b.digest, repo, label=label)
            if opened is None:
                return "mounted"
        except OCIError:
            pass
        break  # the registry opened a plain upload instead (`opened`): upload below, into it
    client.upload_blob(ep, b.digest, b.size, b.chunks, label=label, chunk_size=chunk_size,
                       url=opened)  # fmt: skip
    return "uploaded"


class _MountHints:
    """Which repositories of a registry this cache pushed a blob to (for cross-repo mounts)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "pushed.json"
        self.lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def repos(self, registry: str, digest: str) -> list[str]:
        return list(self._load().get(registry, {}).get(digest, []))

    def add(self, registry: str, repo: str, digests: list[str]) -> None:
        from tlimage.cache.store import atomic_write_bytes

        with self.lock:
            doc = self._load()
            reg = doc.setdefault(registry, {})
            for d in digests:
                repos = reg.setdefault(d, [])
                if repo not in repos:
                    repos.insert(0, repo)
                    del repos[8:]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(doc).encode(), durable=False)
