"""A build cache kept in a registry, as BuildKit's registry cache (`type=registry`).

`--cache-to REF` pushes, after a build, every layer the build's steps made or reused and one
OCI manifest beside them whose config blob (media type `application/vnd.tlimage.build-cache.v1
+json`) maps each step's cache key to its layer:

    {"version": 1, "steps": [{"key": "<step key>", "layer": "sha256:…", "diff_id": "sha256:…",
                              "size": 123, "empty": false, "media_type": "…+zstd"}, …]}

(`media_type` is the layer blob's: zstd for the layers builds make, gzip for a pulled base's
layer kept as the registry sent it; absent means zstd.)

`--cache-from REF` reads that map (one manifest and one small blob) before a build; a step that
misses locally but is in the map is CACHED without its bytes (`entry`), and its layer is fetched
only when something needs its files (`fetch`: a later step that runs on top of it, a COPY --from
or mount of its stage, the final image), checked like any pulled layer — as BuildKit's lazy
blobs, a fresh machine downloads just the layers of the image it builds. Keys are
content-addressed (files by digest, bases by content), so they agree across machines. A cache
reference that does not exist yet is reported and skipped.

`--cache-to` writes every step of the build, fetched or not: a layer left in a `--cache-from`
registry is mounted from there (same registry) or streamed across, never stored here.
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
from tlimage.oci.pull import layer_key
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

    def entry(self, key: str) -> CacheEntry | None:
        """The map's entry for `key` (a step or seed base key), or None."""
        found = self.entries.get(key)
        return found[0] if found else None

    def fetch(self, cache: Any, keys: list[str]) -> tuple[dict[str, Any], int]:
        """The LayerRecords of `keys` (each in the map), their layers fetched into `cache`'s
        store in parallel and each key indexed there; and the bytes downloaded."""
        from tlimage.cache.layer import LayerInfo
        from tlimage.oci.pull import fetch_layers

        keys = list(dict.fromkeys(keys))
        wanted = []
        for key in keys:
            entry, ep, _label = self.entries[key]
            desc = {"digest": entry.layer, "size": entry.size, "mediaType": entry.media_type}
            wanted.append((ep, desc, entry.diff_id))
        labels = ", ".join(dict.fromkeys(self.entries[k][2] for k in keys))
        got = fetch_layers(cache, self.client, wanted, label=f"cache {labels}")
        out = {}
        for key, (layer, _downloaded) in zip(keys, got, strict=True):
            entry, _ep, label = self.entries[key]
            rec = cache.index.get(layer_key(layer.blob), touch=False)
            info = LayerInfo(rec.digest, rec.diff_id, rec.size, rec.uncompressed_size, 0)
            out[key] = cache.put(key, info, description=f"from cache {label}",
                                 meta={"empty": entry.empty})  # fmt: skip
        return out, sum(downloaded for _layer, downloaded in got)


def export(
    cache: Any,
    keys: list[str],
    ref_text: str,
    client: cl.RegistryClient,
    remote: RemoteCache | None = None,
) -> Any:
    """Push the layers of `keys` and the key map to `ref_text`: those the local cache holds,
    and those still only in `remote` (the build's --cache-from), which are mounted or streamed
    from there."""
    from tlimage.oci.push import push

    store = cache.store
    steps = []
    blobs: dict[str, Blob] = {}
    with tempfile.TemporaryDirectory(dir=str(store.path), prefix="cache-to-") as tmpd:
        for key in dict.fromkeys(keys):
            rec = cache.index.get(key, touch=False)
            found = remote.entries.get(key) if remote is not None else None
            if rec is not None and store.size(rec.digest) == rec.size:
                b = layer_blob(store, rec.digest, "zstd", Path(tmpd))
                entry = CacheEntry(key, b.digest, rec.diff_id, b.size,
                                   bool(rec.meta.get("empty")), b.media_type)  # fmt: skip
                if found is not None and found[0].layer == b.digest:  # fetched from there
                    b.origin = found[1]
            elif found is not None:
                entry, ep, _label = found
                b = Blob(entry.layer, entry.size, entry.media_type, origin=ep,
                         reader=_reader(client, ep, entry))  # fmt: skip
            else:
                continue
            blobs.setdefault(b.digest, b)
            steps.append({"key": key, "layer": entry.layer, "diff_id": entry.diff_id,
                          "size": entry.size, "empty": entry.empty,
                          "media_type": entry.media_type})  # fmt: skip
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


def _reader(client: cl.RegistryClient, ep: cl.Endpoint, entry: CacheEntry) -> Any:
    def read() -> Any:
        return client.iter_blob(ep, entry.layer, entry.size, label=f"cache layer {entry.layer}")

    return read
