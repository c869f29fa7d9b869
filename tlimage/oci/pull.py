"""Pull an image from a registry into the layer store.

    image = pull("python:3.12-slim", cache, platform="linux/amd64")

Resolution: the reference's manifest (or index, from which the platform's manifest is chosen)
is fetched and its digest pinned. Without `refresh`, a reference resolved before is answered
from the last resolution recorded under `<cache>/oci-v1/` when its layers are still stored: no
network at all. A resolution that differs from the last one is reported (`moved_from`).

Layers: each is streamed once — sha256 of the compressed bytes checked against the manifest as
they arrive (a blob longer than declared is cut off at once; a blob that fails stores nothing)
— and stored as it came: gzip and zstd layers byte for byte, so a pull writes what the registry
sent (as `skopeo copy` does) and a later push of the layer finds it in place. The image
config's diff_id is checked by the layer's first unpack, which inflates it anyway (as
containerd checks it on unpack): `tlimage.cache.layer.claim_diff_id`; a mismatch discards the
blob. A blob that was already stored is another image's too: a config that disagrees with it
is checked at once and the image refused, the blob kept (`_claim`). The unpack applies the path rules of `tlimage._fs` (no `..`, links kept inside). An
uncompressed tar is checked (`TarChecker`, diff_id) and compressed with zstd on the way in.
Layers download in parallel; a download that breaks off is restarted a bounded number of times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage import _layout
from tlimage._fs import refused_entry
from tlimage.errors import OCIError
from tlimage.oci import client as cl
from tlimage.oci.reference import Reference, parse

Progress = Callable[[dict[str, Any]], None]
# Where a blob is read: an endpoint, or endpoints in order (a mirror's failure falls to the next).
Endpoints = cl.Endpoint | list[cl.Endpoint]
LAYOUT = _layout.OCI.path
DEFAULT_PLATFORM = "linux/amd64"

FOREIGN_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)


@dataclass(frozen=True)
class PulledLayer:
    digest: str  # the layer blob in the store (xxh3:…)
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # bytes of the stored blob
    blob: str  # the registry's digest of the compressed blob it came from (sha256:…)
    media_type: str = ""


@dataclass
class PulledImage:
    ref: str  # as asked for, familiar form
    name: str  # canonical name: registry/repository
    digest: str  # the platform manifest's digest
    platform: str
    config: dict[str, Any]  # the OCI image config document
    layers: list[PulledLayer]
    index_digest: str | None = None
    tag: str | None = None
    offline: bool = False  # answered from the recorded resolution, no network
    moved_from: str | None = None  # the previous resolution, when it differs
    downloaded: int = 0  # layers fetched this time
    bytes: int = 0

    @property
    def pinned(self) -> str:
        return f"{self.name}@{self.digest}"

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PulledImage:
        layers = [PulledLayer(**la) for la in obj.pop("layers")]
        return cls(layers=layers, **obj)


@dataclass
class _Ctx:
    cache: Any  # a tlimage.cache.LayerCache
    client: cl.RegistryClient
    label: str
    progress: Progress | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)  # a layer failed: stop all


def state_root(cache: Any) -> Path:
    return Path(cache.root) / LAYOUT


@dataclass
class Resolved:
    """An image resolved to one platform's manifest, its layers not fetched: what a build
    needs before any layer (the digest for keys, the config). `fetch` gets the layers."""

    ref: str  # as asked for
    name: str  # canonical name: registry/repository
    digest: str  # the platform manifest's digest
    platform: str
    config: dict[str, Any]  # the OCI image config document
    layers: list[dict[str, Any]]  # the manifest's layer descriptors, each with its "diff_id"
    index_digest: str | None = None
    tag: str | None = None
    offline: bool = False  # answered from the recorded resolution, no network
    moved_from: str | None = None  # the previous resolution, when it differs

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "platform": self.platform,
                "config": self.config, "layers": self.layers,
                "index_digest": self.index_digest}  # fmt: skip

    @property
    def size(self) -> int:
        return sum(int(d["size"]) for d in self.layers)


def pull(
    ref_text: str,
    cache: Any,
    *,
    platform: str = DEFAULT_PLATFORM,
    refresh: bool = False,
    config: cl.RegistryConfig | None = None,
    client: cl.RegistryClient | None = None,
    progress: Progress | None = None,
    jobs: int = 6,
    label: str | None = None,
) -> PulledImage:
    """Resolve `ref_text` and make sure its layers are in `cache`'s store (see the module
    docstring), `jobs` layers at a time (6, as containers/image downloads). `label` names the
    asker in errors (a Dockerfile line), default the reference."""
    with _own_client(client, config) as client_:
        res = resolve(ref_text, cache, platform=platform, refresh=refresh, client=client_,
                      label=label)  # fmt: skip
        return fetch(res, cache, client=client_, progress=progress, jobs=jobs, label=label)


def resolve(
    ref_text: str,
    cache: Any,
    *,
    platform: str = DEFAULT_PLATFORM,
    refresh: bool = False,
    config: cl.RegistryConfig | None = None,
    client: cl.RegistryClient | None = None,
    label: str | None = None,
) -> Resolved:
    """`ref_text` resolved to its platform manifest and config, no layer fetched. Without
    `refresh` a resolution recorded before is answered offline."""
    ref = parse(ref_text)
    label = label or ref_text
    platform = normalize_platform(platform)
    previous = _load_resolution(cache, ref, platform)
    if previous is not None and not refresh:
        res = _load_resolved(cache, previous)
        if res is not None:
            res.ref, res.tag, res.offline = ref_text, ref.tag, True
            return res
    with _own_client(client, config) as client_:
        res = _resolve(_Ctx(cache, client_, label, None), ref, ref_text, platform)
    if previous is not None and previous != res.digest and ref.digest is None:
        res.moved_from = previous
    _save(cache, ref, platform, res)
    return res


def _resolve(ctx: _Ctx, ref: Reference, ref_text: str, platform: str) -> Resolved:
    fetched, ep = ctx.client.get_manifest(ref, label=ctx.label)
    index_digest = None
    if fetched.media_type in cl.INDEX_TYPES or _is_index(fetched.data):
        index_digest = fetched.digest
        chosen = select_platform(json.loads(fetched.data), platform, ctx.label)
        fetched = ctx.client._get_manifest(ep, chosen, ctx.label)
        if fetched is None:
            raise OCIError(f"{ctx.label}: the index names manifest {chosen} for {platform}, but "
                           f"{ep} does not have it", ref=ctx.label)  # fmt: skip
    manifest = _manifest_doc(fetched, ctx.label)
    known = _load_resolved(ctx.cache, fetched.digest)
    if known is not None:  # the same manifest as before: its config is known
        known.ref, known.tag, known.index_digest = ref_text, ref.tag, index_digest
        return known
    cdesc = manifest["config"]
    eps = _blob_endpoints(ctx, ref, ep)
    config_bytes = _on_endpoints(ctx, eps, lambda e: ctx.client.get_blob_bytes(
        e, cdesc["digest"], int(cdesc["size"]), label=ctx.label))  # fmt: skip
    try:
        config = json.loads(config_bytes)
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError):
        raise OCIError(f"{ctx.label}: the image config {cdesc['digest']} is not a valid image "
                       "config (no rootfs.diff_ids)", ref=ctx.label) from None  # fmt: skip
    descs = manifest.get("layers") or []
    if len(descs) != len(diff_ids):
        raise OCIError(f"{ctx.label}: the manifest lists {len(descs)} layers but the config "
                       f"{len(diff_ids)} diff_ids", ref=ctx.label)  # fmt: skip
    layers = []
    for d, diff_id in zip(descs, diff_ids, strict=True):
        mt = d.get("mediaType", "")
        if mt in FOREIGN_TYPES or "nondistributable" in mt or "foreign" in mt or d.get("urls"):
            raise OCIError(
                f"{ctx.label}: layer {d.get('digest')} is a foreign (non-distributable) layer "
                f"({mt}); tlimage does not fetch layers from outside the registry",
                ref=ctx.label, hint="such layers are Windows base layers; use a Linux image",
            )  # fmt: skip
        _compression(mt, ctx.label)
        layers.append({"digest": str(d["digest"]), "size": int(d["size"]), "mediaType": mt,
                       "diff_id": str(diff_id)})  # fmt: skip
    return Resolved(ref_text, ref.name, fetched.digest, platform, config, layers,
                    index_digest, ref.tag)  # fmt: skip


def stored_layers(cache: Any, res: Resolved) -> list[PulledLayer | None]:
    """For each layer of `res`: its PulledLayer when the store holds it, else None."""
    out: list[PulledLayer | None] = []
    for d in res.layers:
        rec = cache.lookup(layer_key(d["digest"]))
        ok = rec is not None and rec.diff_id == d["diff_id"]
        out.append(PulledLayer(rec.digest, rec.diff_id, rec.size, d["digest"], d["mediaType"])
                   if ok else None)  # fmt: skip
    return out


def fetch(
    res: Resolved,
    cache: Any,
    *,
    config: cl.RegistryConfig | None = None,
    client: cl.RegistryClient | None = None,
    progress: Progress | None = None,
    jobs: int = 6,
    label: str | None = None,
) -> PulledImage:
    """The layers of `res` into `cache`'s store (no network when all are there), `jobs` at a
    time; the image recorded for offline use."""
    label = label or res.ref
    img = PulledImage(ref=res.ref, name=res.name, digest=res.digest, platform=res.platform,
                      config=res.config, layers=[], index_digest=res.index_digest, tag=res.tag,
                      offline=res.offline, moved_from=res.moved_from)  # fmt: skip
    have = stored_layers(cache, res)
    if all(la is not None for la in have):
        img.layers = [la for la in have if la is not None]
        return img
    if progress:
        progress({"event": "pull_started", "ref": label, "digest": res.digest,
                  "layers": len(res.layers), "size": res.size})  # fmt: skip
    t0 = time.monotonic()
    with _own_client(client, config) as client_:
        eps = client_.endpoints(parse(f"{res.name}@{res.digest}"))
        wanted = [(eps, d, d["diff_id"]) for d in res.layers]
        results = fetch_layers(cache, client_, wanted, label=label, progress=progress,
                               jobs=jobs)  # fmt: skip
    img.layers = [r[0] for r in results]
    img.downloaded = sum(1 for r in results if r[1])
    img.bytes = sum(r[1] for r in results)
    img.offline = False
    if progress:
        progress({"event": "pull_done", "ref": label, "digest": img.digest,
                  "downloaded": img.downloaded, "bytes": img.bytes,
                  "duration": round(time.monotonic() - t0, 3)})  # fmt: skip
    return img


@contextlib.contextmanager
def _own_client(client: cl.RegistryClient | None,
                config: cl.RegistryConfig | None) -> Iterator[Any]:  # fmt: skip
    """`client`, or one made from `config` on first use (an offline answer needs none, and
    spares importing the HTTP stack) and closed after the block."""
    if client is not None:
        yield client
        return
    own = _OnDemand(config)
    try:
        yield own
    finally:
        own.close()


class _OnDemand:
    def __init__(self, config: cl.RegistryConfig | None) -> None:
        self._config = config
        self._client: cl.RegistryClient | None = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = cl.RegistryClient(self._config)
        return getattr(self._client, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def fetch_layers(cache: Any, client: cl.RegistryClient,
                 layers: list[tuple[Endpoints, dict[str, Any], str]], *, label: str,
                 progress: Progress | None = None,
                 jobs: int = 6) -> list[tuple[PulledLayer, int]]:  # fmt: skip
    """Make sure each layer — (endpoint or endpoints in order, registry descriptor, diff_id) —
    is in `cache`'s store and indexed under `layer_key(blob)`: one stored before costs a
    lookup, the rest download `jobs` at a time. For each layer, in order: (its PulledLayer,
    bytes downloaded)."""
    ctx = _Ctx(cache, client, label, progress)
    # The cache index is used from this thread only; workers download and store blobs.
    results: list[tuple[PulledLayer, int] | None] = [None] * len(layers)
    todo = []
    for i, (_ep, d, diff_id) in enumerate(layers):
        rec = cache.lookup(layer_key(str(d["digest"])))
        if rec is not None and rec.diff_id != diff_id:
            # Stored for another image whose config said otherwise: this config's claim is
            # checked against the stored blob now, which it never discards or un-verifies.
            _claim(ctx, rec.digest, str(d["digest"]), diff_id, new_blob=False)
            rec = None  # the claim holds: fetched again, and the row rewritten
        if rec is not None:
            results[i] = (PulledLayer(rec.digest, rec.diff_id, rec.size, str(d["digest"]),
                                      d.get("mediaType", "")), 0)  # fmt: skip
            if progress:
                progress({"event": "pull_layer", "ref": label, "layer": d["digest"],
                          "status": "exists", "total": int(d["size"]),
                          "bytes": int(d["size"])})  # fmt: skip
        else:
            todo.append(i)
    if todo:
        done: list[tuple[int, Any, PulledLayer]] = []
        failed: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo))),
                                thread_name_prefix="tlimage-pull") as pool:  # fmt: skip
            futures = {pool.submit(_on_endpoints, ctx, _chain(layers[i][0]),
                                   lambda e, i=i: _layer(ctx, e, *layers[i][1:])): i
                       for i in todo}  # fmt: skip
            for fut in as_completed(futures):
                try:
                    info, layer = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the rows
                    if failed is None:
                        failed = e
                        ctx.stop.set()  # the other downloads stop at their next piece
                        for f in futures:
                            f.cancel()
                    continue
                done.append((futures[fut], info, layer))
        # Every layer that arrived whole is kept under its row, also when another failed (a
        # second attempt fetches only what is missing); a layer that did not arrive whole left
        # nothing behind.
        cache.store.sync_dir()  # the new blobs' names, before index rows name them
        for i, info, layer in done:
            cache.put(layer_key(layer.blob), info, description=f"pulled {label} {layer.blob[:19]}",
                      meta={"blob": layer.blob, "media_type": layer.media_type})  # fmt: skip
            results[i] = (layer, int(layers[i][1]["size"]))
        if failed is not None:
            raise failed
    return [r for r in results if r is not None]


def _chain(eps: Endpoints) -> list[cl.Endpoint]:
    return list(eps) if isinstance(eps, (list, tuple)) else [eps]


def _blob_endpoints(ctx: _Ctx, ref: Reference, ep: cl.Endpoint) -> list[cl.Endpoint]:
    """Where blobs are read: `ep` (which served the manifest), then the endpoints after it."""
    eps = ctx.client.endpoints(ref)
    return eps[eps.index(ep) :] if ep in eps else [ep]


def _on_endpoints(ctx: _Ctx, eps: list[cl.Endpoint], fetch: Callable[[cl.Endpoint], Any]) -> Any:
    """`fetch` from the first endpoint; a mirror that fails it (the blob missing, broken or
    unreachable) falls back to the next endpoint, as a manifest does."""
    for k, e in enumerate(eps):
        try:
            return fetch(e)
        except OCIError as err:
            if e.mirror_of is None or k == len(eps) - 1 or ctx.stop.is_set():
                raise
            if ctx.progress:
                ctx.progress({"event": "status", "ref": ctx.label,
                              "message": f"mirror {e.host}: {err.message}; trying "
                              f"{eps[k + 1].host}"})  # fmt: skip
    raise AssertionError("unreachable")


# -- platforms ------------------------------------------------------------------------------


def normalize_platform(text: str) -> str:
    parts = [p for p in (text or DEFAULT_PLATFORM).lower().split("/") if p]
    if len(parts) == 1:
        parts = ["linux", parts[0]]
    if len(parts) not in (2, 3):
        raise OCIError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(parts[1], parts[1])
    parts[1] = arch
    if arch == "arm64" and len(parts) == 3 and parts[2] == "v8":
        parts = parts[:2]
    return "/".join(parts)


def _plat_of(entry: dict[str, Any]) -> str | None:
    p = entry.get("platform") or {}
    if not p.get("os") or not p.get("architecture"):
        return None
    text = f"{p['os']}/{p['architecture']}" + (f"/{p['variant']}" if p.get("variant") else "")
    return normalize_platform(text)


def select_platform(index: dict[str, Any], platform: str, label: str) -> str:
    """The digest of the index entry for `platform`; an error lists the platforms present."""
    want = normalize_platform(platform)
    present: list[str] = []
    fallback = None
    for entry in index.get("manifests") or []:
        if (entry.get("annotations") or {}).get("vnd.docker.reference.type"):
            continue  # attestations, signatures
        plat = _plat_of(entry)
        if plat is None:
            continue
        present.append(plat)
        if plat == want:
            return str(entry["digest"])
        # linux/arm (no variant) accepts the first arm variant; a variant-less entry serves
        # a request with a variant.
        if fallback is None and (plat.startswith(want + "/") or want.startswith(plat + "/")):
            fallback = str(entry["digest"])
    if fallback:
        return fallback
    raise OCIError(
        f"{label}: no image for platform {want}; the index has: "
        f"{', '.join(dict.fromkeys(present)) or 'no platforms'}",
        ref=label, hint="choose one with --platform",
    )  # fmt: skip


def _is_index(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and "manifests" in doc and "layers" not in doc


def _manifest_doc(fetched: cl.Fetched, label: str) -> dict[str, Any]:
    if fetched.media_type.startswith("application/vnd.docker.distribution.manifest.v1"):
        raise OCIError(f"{label}: Docker schema 1 manifests are not supported (deprecated since "
                       "2017); push the image again with a current client", ref=label)  # fmt: skip
    doc = json.loads(fetched.data)
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) or \
            not isinstance(doc.get("layers", []), list):  # fmt: skip
        raise OCIError(f"{label}: manifest {fetched.digest} is not an image manifest "
                       f"({fetched.media_type or 'no media type'})", ref=label)  # fmt: skip
    ctype = doc["config"].get("mediaType", "")
    if ctype and ctype not in (cl.OCI_CONFIG, cl.DOCKER_CONFIG):
        raise OCIError(f"{label}: {fetched.digest} is an OCI artifact ({ctype}), not an image",
                       ref=label)  # fmt: skip
    return doc


def _compression(media_type: str, label: str) -> str:
    mt = media_type.lower()
    if mt.endswith("+zstd") or mt.endswith(".zstd"):
        return "zstd"
    if mt.endswith("gzip") or mt.endswith("+gzip") or mt == cl.DOCKER_LAYER:
        return "gzip"
    if mt.endswith(".tar") or mt.endswith("tar") or mt == "":
        return "none"
    raise OCIError(f"{label}: layer media type {media_type!r} is not a tar (gzip, zstd or "
                   "uncompressed)", ref=label)  # fmt: skip


# -- one layer ------------------------------------------------------------------------------


def stored_media(kind: str) -> str:
    """The media type of the blob the store keeps for a layer that came in `kind`."""
    return cl.OCI_LAYER_GZIP if kind == "gzip" else cl.OCI_LAYER_ZSTD


def layer_key(blob_digest: str) -> str:
    return f"oci-layer:{blob_digest}"


def _layer(ctx: _Ctx, ep: cl.Endpoint, desc: dict[str, Any],
           diff_id: str) -> tuple[Any, PulledLayer]:  # fmt: skip
    """Download one layer into the store (run in a worker thread): (LayerInfo, PulledLayer)."""
    from tlimage.cache.layer import LayerInfo, sniff_compression

    digest, size = str(desc["digest"]), int(desc["size"])
    media = desc.get("mediaType", "")
    kind = _compression(media, ctx.label)
    retries = ctx.client.config.retries
    for attempt in range(retries + 1):
        done = 0
        last = 0.0

        def on_bytes(n: int) -> None:
            nonlocal done, last
            if ctx.stop.is_set():
                raise OCIError(f"{ctx.label}: layer {digest} stopped: another layer failed",
                               ref=ctx.label)  # fmt: skip
            done += n
            now = time.monotonic()
            if ctx.progress and (now - last > 0.2 or done == size):
                last = now
                ctx.progress(
                    {
                        "event": "pull_layer",
                        "ref": ctx.label,
                        "layer": digest,
                        "status": "downloading",
                        "bytes": done,
                        "total": size,
                    }
                )

        try:
            with ctx.cache.store.writer() as w:
                chunks = ctx.client.iter_blob(ep, digest, size, label=ctx.label,
                                              on_bytes=on_bytes)  # fmt: skip
                if kind == "none":  # a plain tar: checked and compressed on the way in
                    conv = Converter(kind, w, label=ctx.label, layer=digest)
                    for chunk in chunks:
                        conv.feed(chunk)
                    got_diff, usize, entries = conv.finish()
                    if got_diff != diff_id:
                        raise OCIError(f"{ctx.label}: layer {digest} unpacks to {got_diff}, but "
                                       f"the image config says {diff_id}; nothing was stored",
                                       ref=ctx.label)  # fmt: skip
                else:  # kept as sent; the diff_id is checked by the first unpack
                    usize = entries = 0
                    head = b""
                    for chunk in chunks:
                        if len(head) < 4:
                            head += chunk[: 4 - len(head)]
                        w.write(chunk)
                    if sniff_compression(head) != kind:
                        raise OCIError(f"{ctx.label}: layer {digest} is not {kind} data as its "
                                       "media type says; nothing was stored",
                                       ref=ctx.label)  # fmt: skip
                blob = w.commit(sync_dir=False)  # the folder is synced once, in _pull
                if kind != "none":
                    _claim(ctx, blob.digest, digest, diff_id, new_blob=not blob.existed)
        except cl.BlobInterrupted:
            if attempt == retries:
                raise
            time.sleep(ctx.client._backoff(attempt + 1))
            continue
        if ctx.progress:
            ctx.progress({"event": "pull_layer", "ref": ctx.label, "layer": digest,
                          "status": "done", "bytes": size, "total": size})  # fmt: skip
        info = LayerInfo(blob.digest, diff_id, blob.size, usize, entries, stored_media(kind))
        return info, PulledLayer(blob.digest, diff_id, blob.size, digest, media)
    raise AssertionError("unreachable")


def _claim(ctx: _Ctx, stored: str, blob: str, diff_id: str, *, new_blob: bool) -> None:
    """Record that the stored layer `stored` (the registry's `blob`) must unpack to `diff_id`
    (`tlimage.cache.layer.claim_diff_id`), or refuse the image when the stored layer is known
    to unpack to something else. A wrong config changes nothing in the store."""
    from tlimage.cache.layer import LayerError, claim_diff_id

    try:
        actual = claim_diff_id(ctx.cache.store, stored, diff_id, new_blob=new_blob,
                               source=ctx.label)  # fmt: skip
    except LayerError as e:
        raise OCIError(f"{ctx.label}: layer {blob}: {e.message}", ref=ctx.label) from None
    if actual is not None:
        raise OCIError(
            f"{ctx.label}: layer {blob} unpacks to {actual}, but the image config says "
            f"{diff_id}; the image is refused (the stored layer, which other images use, is "
            "kept)", ref=ctx.label,
            hint="the image in the registry is broken: its config does not describe its layers",
        )  # fmt: skip


def ingest_layer(store: Any, chunks: Any, *, blob: str | None, size: int | None, media_type: str,
                 diff_id: str | None, label: str,
                 standalone: bool = False) -> tuple[Any, PulledLayer]:  # fmt: skip
    """Store a layer read from anywhere (an OCI layout, an archive): the compressed bytes in
    `chunks` are checked against `blob` (sha256) and `size` when given, and the tar against
    `diff_id`. Returns (LayerInfo, PulledLayer); nothing is stored when a check fails.
    `standalone`: the layer has nothing under it (a root filesystem tarball), so a hard link
    must name an entry earlier in it."""
    from tlimage.cache.layer import LayerInfo

    kind = _compression(media_type, label)
    h = hashlib.sha256()
    seen = 0
    with store.writer() as w:
        conv = Converter(kind, w, label=label, layer=blob or "(layer)", standalone=standalone)
        for chunk in chunks:
            seen += len(chunk)
            if size is not None and seen > size:
                raise OCIError(f"{label}: layer {blob} is larger than its declared {size} bytes",
                               ref=label)  # fmt: skip
            h.update(chunk)
            conv.feed(chunk)
        got_diff, usize, entries = conv.finish()
        actual = "sha256:" + h.hexdigest()
        if blob is not None and actual != blob:
            raise OCIError(f"{label}: layer blob hashes to {actual}, not {blob}; nothing was "
                           "stored", ref=label)  # fmt: skip
        if diff_id is not None and got_diff != diff_id:
            raise OCIError(f"{label}: layer {blob or ''} unpacks to {got_diff}, but the image "
                           f"config says {diff_id}; nothing was stored", ref=label)  # fmt: skip
        ref = w.commit()
    info = LayerInfo(ref.digest, got_diff, ref.size, usize, entries, stored_media(kind))
    return info, PulledLayer(ref.digest, got_diff, ref.size, blob or actual, media_type)


class Converter:
    """Push-style: compressed layer bytes in (`feed`), the layer blob out to `out`, the
    uncompressed tar hashed and its headers checked on the way. gzip and zstd bytes are kept
    as they came (the store reads both); an uncompressed tar is stored compressed with zstd."""

    def __init__(self, kind: str, out: Any, *, label: str, layer: str,
                 standalone: bool = False) -> None:  # fmt: skip
        import zstandard

        from tlimage.cache.layer import GZIP_ERRORS, gzip_decompressor

        self._gunzip = gzip_decompressor
        self._errors = (*GZIP_ERRORS, zstandard.ZstdError)
        self.kind = kind
        self.out = out
        self.diff = hashlib.sha256()
        self.usize = 0
        self.tar = TarChecker(f"{label}: layer {layer}", label, standalone=standalone)
        self._zstd = zstandard
        self._head = b""  # the first bytes, to check they are what the media type says
        if kind == "gzip":
            self._d: Any = gzip_decompressor()
        elif kind == "zstd":
            self._d = zstandard.ZstdDecompressor().decompressobj()
        else:
            self._d = None
        self._c = None
        if kind == "none":
            cctx = zstandard.ZstdCompressor(level=1, threads=1, write_checksum=True)
            self._c = cctx.compressobj()

    def feed(self, chunk: bytes) -> None:
        if self._c is None:
            if len(self._head) < 4:
                self._head += chunk[: 4 - len(self._head)]
            self.out.write(chunk)
        data = chunk
        while data:
            if self._d is None:
                self._plain(data)
                return
            try:
                self._plain(self._d.decompress(data))
            except self._errors as e:
                raise OCIError(f"{self.tar.where}: not valid {self.kind} data: {e}",
                               ref=self.tar.label) from None  # fmt: skip
            data = b""
            if self._d.eof and self._d.unused_data:  # a next gzip member / zstd frame
                data = self._d.unused_data
                self._d = (self._gunzip() if self.kind == "gzip"
                           else self._zstd.ZstdDecompressor().decompressobj())  # fmt: skip

    def _plain(self, data: bytes) -> None:
        if not data:
            return
        self.diff.update(data)
        self.usize += len(data)
        self.tar.feed(data)
        if self._c is not None:
            self.out.write(self._c.compress(data))

    def finish(self) -> tuple[str, int, int]:
        from tlimage.cache.layer import sniff_compression

        if self.kind == "gzip":
            self._plain(self._d.flush())
            if not self._d.eof and self.usize:
                raise OCIError(f"{self.tar.where}: the gzip data ends in the middle",
                               ref=self.tar.label)  # fmt: skip
        if self._c is not None:
            self.out.write(self._c.flush())
        elif sniff_compression(self._head) != self.kind:
            # The store tells a blob's compression by its first bytes: they must agree.
            raise OCIError(f"{self.tar.where}: the data is not {self.kind} as its media type "
                           "says", ref=self.tar.label)  # fmt: skip
        self.tar.finish()
        return "sha256:" + self.diff.hexdigest(), self.usize, self.tar.entries


class TarChecker:
    """Reads tar headers from a byte stream pushed in pieces and refuses what a layer may not
    hold (`tlimage._fs.refused_entry`: names or hard-link targets with `..`; device nodes are
    accepted anywhere, as Docker accepts them). `standalone`: a layer with nothing under it,
    whose hard links must name entries earlier in it (else its unpack would refuse the link
    only later, at a build or a sandbox's start)."""

    def __init__(self, where: str, label: str, *, standalone: bool = False) -> None:
        self.where = where
        self.label = label
        self._seen: set[str] | None = set() if standalone else None
        self.entries = 0
        self._buf = bytearray()
        self._skip = 0
        self._pax: dict[str, str] = {}
        self._long: dict[str, str] = {}
        self._ended = False
        self._pending: tuple[str, int, bytearray] | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            if self._ended:
                return
            need = 512 - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == 512:
                block = bytes(self._buf)
                self._buf.clear()
                self._header(block)

    def _header(self, block: bytes) -> None:
        pending = self._pending  # a pax or GNU long-name payload, read whole
        if pending is not None:
            kind, size, buf = pending
            buf += block
            if len(buf) >= size:
                self._pending = None
                self._meta(kind, bytes(buf[:size]))
            return
        if block == b"\0" * 512:
            self._ended = True
            return
        if _checksum(block) != _octal(block[148:156]):
            self._fail("a tar header's checksum is wrong (not a tar, or corrupt)")
        typ = chr(block[156]) if block[156] else "0"
        size = _number(block[124:136])
        if typ in "xgLK":
            if size > 1 << 20:
                self._fail(f"a tar metadata entry of {size} bytes is too large")
            if size:
                self._pending = (typ, size, bytearray())
            return
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = prefix + "/" + name
        link = block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = self._pax.get("path") or self._long.get("L") or name
        link = self._pax.get("linkpath") or self._long.get("K") or link
        if "size" in self._pax:
            try:
                size = int(self._pax["size"])
            except ValueError:
                self._fail("a pax size is not a number")
        self._pax, self._long = {}, {}
        self.entries += 1
        if (why := refused_entry(name, typ, link)) is not None:
            self._fail(why)
        if self._seen is not None:
            if typ == "1" and _entry(link) not in self._seen:
                self._fail(f"hard link {name!r} names {link!r}, which is not earlier in the "
                           "archive (a root filesystem tarball is a layer on its own)")  # fmt: skip
            self._seen.add(_entry(name))
        if typ in "0\x007":
            self._skip = (size + 511) // 512 * 512
        elif typ not in "1256":
            self._skip = (size + 511) // 512 * 512

    def _meta(self, kind: str, data: bytes) -> None:
        if kind in "LK":
            self._long[kind] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            return
        if kind == "g":
            return
        i = 0
        while i < len(data):
            sp = data.find(b" ", i)
            if sp < 0:
                break
            try:
                length = int(data[i:sp])
            except ValueError:
                self._fail("a pax header is malformed")
            rec = data[sp + 1 : i + length - 1]
            k, _, v = rec.partition(b"=")
            self._pax[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
            if length <= 0:
                self._fail("a pax header is malformed")
            i += length

    def finish(self) -> None:
        if self._pending is not None or self._skip:
            self._fail("the tar ends in the middle of an entry")

    def _fail(self, why: str) -> None:
        raise OCIError(f"{self.where}: {why}; nothing was stored", ref=self.label)


def _entry(name: str) -> str:
    """A tar member's path as the unpack sees it (`./a//b/` is `a/b`)."""
    return posixpath.normpath("/" + name).lstrip("/")


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:])


def _octal(field_: bytes) -> int:
    text = field_.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return -1


def _number(field_: bytes) -> int:
    if field_[0] & 0x80:  # base-256
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    return max(_octal(field_), 0)


# -- the recorded resolutions -------------------------------------------------------------------


def _res_path(cache: Any, ref: Reference, platform: str) -> Path:
    h = hashlib.sha256(f"{ref}|{platform}".encode()).hexdigest()[:32]
    return state_root(cache) / "refs" / f"{h}.json"


def _img_path(cache: Any, digest: str) -> Path:
    return state_root(cache) / "images" / f"{digest.split(':', 1)[-1]}.json"


def _load_resolution(cache: Any, ref: Reference, platform: str) -> str | None:
    if ref.digest and _img_path(cache, ref.digest).exists():
        return ref.digest
    # A tag, or a digest of an index (the platform's manifest it named; it never moves).
    try:
        return json.loads(_res_path(cache, ref, platform).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None


def last_resolution(cache: Any, ref_text: str, platform: str = DEFAULT_PLATFORM) -> str | None:
    return _load_resolution(cache, parse(ref_text), normalize_platform(platform))


def _load_resolved(cache: Any, digest: str) -> Resolved | None:
    """The recorded resolution of manifest `digest`: its config and layer descriptors."""
    try:
        obj = json.loads(_img_path(cache, digest).read_text())
        if obj["layers"] and "blob" in obj["layers"][0]:
            return _from_pulled(cache, PulledImage.from_json(obj))  # written by an older version
        return Resolved(ref=obj["name"], name=obj["name"], digest=obj["digest"],
                        platform=obj["platform"], config=obj["config"], layers=obj["layers"],
                        index_digest=obj.get("index_digest"))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _from_pulled(cache: Any, img: PulledImage) -> Resolved | None:
    """An image record of an older version as a resolution, when its layers are all stored
    (it kept no registry sizes; a stored layer is never downloaded again)."""
    if not all(cache.store.size(la.digest) == la.size for la in img.layers):
        return None
    layers = [{"digest": la.blob, "size": la.size, "mediaType": la.media_type,
               "diff_id": la.diff_id} for la in img.layers]  # fmt: skip
    return Resolved(img.name, img.name, img.digest, img.platform, img.config, layers,
                    img.index_digest)  # fmt: skip


def _save(cache: Any, ref: Reference, platform: str, res: Resolved) -> None:
    from tlimage.cache.store import atomic_write_bytes

    ip = _img_path(cache, res.digest)
    ip.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(ip, json.dumps(res.to_json(), sort_keys=True).encode(), durable=False)
    if ref.digest != res.digest:  # a tag, or an index's digest
        rp = _res_path(cache, ref, platform)
        rp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(rp, json.dumps({"ref": str(ref), "platform": platform,
                                           "digest": res.digest,
                                           "resolved_at": time.time()}).encode(),
                           durable=False)  # fmt: skip
