"""A build cache kept in a registry, as BuildKit's registry cache (`type=registry`).

`--cache-to REF` pushes, after a build, every layer the build's steps made or reused and one
OCI manifest beside them whose config blob (media type `application/vnd.tlimage.build-cache.v1
+json`) maps each step's cache key to its layer:

    {"version": 1, "steps": [{"key": "<step key>", "layer": "sha256:…", "diff_id": "sha256:…",
                              "size": 123, "empty": false, "media_type": "…+zstd"}, …]}

(`media_type` is the layer blob's: zstd for the layers builds make, gzip for a pulled base's
layer kept as the registry sent it; absent means zstd.)

`--cache-from REF` reads that map (one manifest and one small blob) before a build; a step that
misses locally but is in the map fetches just its layer, checked like any pulled layer, and is
CACHED. Keys are content-addressed (files by digest, bases by manifest digest), so they agree
across machines. A cache reference that does not exist yet is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlimage.errors import OCIError
from tlimage.oci import client as cl
from tlimage.oci.layout import Blob, canonical_json, layer_blob
from tlimage.oci.pull import ingest_layer, layer_key
from tlimage.oci.reference import parse

CONFIG_TYPE = "application/vnd.tlimage.build-cache.v1+json"
ARTIFACT_TYPE = "application/vnd.tlimage.build-cache.v1"


@dataclass(frozen=True)
class CacheEntry:
    key: str
    layer: str  # sha256 of the layer blob in the registry
    diff_id: str
    size: int
    empty: bool = False
    media_type: str = cl.OCI_LAYER_ZSTD


class RemoteCache:
    """The maps of the `--cache-from` references, and fetching their layers on demand."""

    def __init__(self, refs: list[str], client: cl.RegistryClient,
                 status: Any = None) -> None:  # fmt: skip
        self.client = client
        self.entries: dict[str, tuple[CacheEntry, cl.Endpoint, str]] = {}
        self.fetched = 0
        for ref_text in refs:
            try:
                self._load(ref_text)
            except OCIError as e:
                if status:
                    status(f"cache {ref_text} not used: {e.message}")

    def _load(self, ref_text: str) -> None:
        ref = parse(ref_text)
        fetched, ep = self.client.get_manifest(ref, label=ref_text)
        doc = json.loads(fetched.data)
        cfg = doc.get("config") or {}
        if cfg.get("mediaType") != CONFIG_TYPE:
            raise OCIError(f"{ref_text} is not a tlimage build cache ({cfg.get('mediaType')})")
        data = self.client.get_blob_bytes(ep, cfg["digest"], int(cfg["size"]), label=ref_text)
        for s in json.loads(data).get("steps", []):
            entry = CacheEntry(s["key"], s["layer"], s["diff_id"], int(s["size"]),
                               bool(s.get("empty")),
                               str(s.get("media_type") or cl.OCI_LAYER_ZSTD))  # fmt: skip
            self.entries.setdefault(entry.key, (entry, ep, ref_text))

    def __len__(self) -> int:
        return len(self.entries)

    def fetch(self, cache: Any, key: str) -> Any:
        """The LayerRecord for `key`, fetched into `cache` from the registry; None if the map
        lacks it."""
        found = self.entries.get(key)
        if found is None:
            return None
        entry, ep, label = found
        rec = cache.lookup(layer_key(entry.layer))
        if rec is None or rec.diff_id != entry.diff_id:
            chunks = self.client.iter_blob(ep, entry.layer, entry.size, label=label)
            info, _ = ingest_layer(cache.store, chunks, blob=entry.layer, size=entry.size,
                                   media_type=entry.media_type, diff_id=entry.diff_id,
                                   label=label)  # fmt: skip
            cache.put(layer_key(entry.layer), info, description=f"cache {label}")
            self.fetched += 1
        else:
            from tlimage.cache.layer import LayerInfo

            info = LayerInfo(rec.digest, rec.diff_id, rec.size, rec.uncompressed_size, 0)
        return cache.put(key, info, description=f"from cache {label}",
                         meta={"empty": entry.empty})  # fmt: skip


def export(cache: Any, keys: list[str], ref_text: str, client: cl.RegistryClient) -> Any:
    """Push the layers of `keys` (those the local cache holds) and the key map to `ref_text`."""
    from tlimage.oci.push import push

    store = cache.store
    steps = []
    blobs: dict[str, Blob] = {}
    with tempfile.TemporaryDirectory(dir=str(store.path), prefix="cache-to-") as tmpd:
        for key in dict.fromkeys(keys):
            rec = cache.index.get(key, touch=False)
            if rec is None or store.size(rec.digest) != rec.size:
                continue
            b = layer_blob(store, rec.digest, "zstd", Path(tmpd))
            blobs.setdefault(b.digest, b)
            steps.append({"key": key, "layer": b.digest, "diff_id": rec.diff_id, "size": b.size,
                          "empty": bool(rec.meta.get("empty")),
                          "media_type": b.media_type})  # fmt: skip
        cfg = canonical_json({"version": 1, "steps": steps})
        config = Blob("sha256:" + hashlib.sha256(cfg).hexdigest(), len(cfg), CONFIG_TYPE, data=cfg)
        manifest = {
            "schemaVersion": 2, "mediaType": cl.OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size}
                       for b in blobs.values()],
        }  # fmt: skip
        mb = canonical_json(manifest)
        mblob = Blob("sha256:" + hashlib.sha256(mb).hexdigest(), len(mb), cl.OCI_MANIFEST, data=mb)
        return push(
            store,
            None,
            ref_text,
            client=client,
            manifest=mblob,  # type: ignore[arg-type]
            extra_blobs=[*blobs.values(), config],
        )
