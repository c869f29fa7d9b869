"""OCI image layouts and docker-archives: export a stored image, import one (or a plain rootfs
tarball) into the layer store.

Export is reproducible: layer blobs are the store's deterministic zstd layers and the
registry's own bytes of pulled layers (or their gzip / uncompressed form, made with fixed
settings), the config carries no wall-clock time (`created` is the epoch), JSON is written with
sorted keys, and tar archives have sorted entries, zero mtimes and numeric owners 0 — so the
same image gives byte-identical layers, manifest digests and archives on every run and
machine.

    export_image(store, image, dest, fmt="oci"|"docker", ...)   # dest: a folder, or *.tar
    import_image(cache, path, ...)                              # -> PulledImage
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage.errors import OCIError
from tlimage.oci import client as cl
from tlimage.oci.pull import PulledImage, ingest_layer, layer_key, select_platform

EPOCH = "1970-01-01T00:00:00Z"
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20


@dataclass
class LocalImage:
    """A stored image to export or push: its layers bottom first as (store digest, diff_id),
    and the `config` object of its OCI image config (Env, Cmd, ...)."""

    layers: list[tuple[str, str]]
    config: dict[str, Any]
    platform: str = "linux/amd64"
    history: list[dict[str, Any]] = field(default_factory=list)

    def config_doc(self) -> dict[str, Any]:
        os_, arch, *variant = self.platform.split("/")
        doc: dict[str, Any] = {
            "architecture": arch, "os": os_, "created": EPOCH, "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in self.layers]},
            "history": self.history or [{"created": EPOCH, "created_by": "tlimage"}
                                        for _ in self.layers],
        }  # fmt: skip
        if variant:
            doc["variant"] = variant[0]
        return doc


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# -- layer blobs in the wanted compression ----------------------------------------------------


@dataclass
class Blob:
    digest: str  # sha256:…
    size: int
    media_type: str
    path: Path | None = None  # a file holding the bytes (a temp file or the store's blob)
    data: bytes | None = None
    # A registry repository that holds the blob already (a push to the same registry mounts
    # it from there), and for a blob not stored here, the reader of its bytes from there.
    origin: cl.Endpoint | None = None
    reader: Callable[[], Iterator[bytes]] | None = None

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        if self.path is None:
            assert self.reader is not None, self.digest
            yield from self.reader()
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


MEDIA = {"zstd": cl.OCI_LAYER_ZSTD, "gzip": cl.OCI_LAYER_GZIP, "none": cl.OCI_LAYER}


def layer_blob(store: Any, digest: str, compression: str, tmp: Path) -> Blob:
    """The layer `digest` of the store as a blob in `compression`. The stored bytes are used as
    they are when they already are in that compression, and for "zstd" also when they are gzip
    (a layer pulled from a registry keeps the registry's bytes and digest, as BuildKit keeps a
    base's layers unless asked to force a compression: a push then finds it in place or mounts
    it). Anything else is converted into a temp file under `tmp`."""
    from tlimage.cache.layer import BadCompression, blob_compression, open_tar

    src = store.blob_path(digest)
    stored = blob_compression(src)
    if stored == compression or (compression == "zstd" and stored == "gzip"):
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return Blob("sha256:" + h.hexdigest(), size, MEDIA[stored], path=src)
    import zstandard

    fd, name = tempfile.mkstemp(dir=tmp, prefix="blob-")
    out_path = Path(name)
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out, store.open(digest, verify=True) as raw:
        reader, _ = open_tar(raw)
        comp: Any = None
        if compression == "gzip":
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif compression == "zstd":
            comp = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()

        def put(data: bytes) -> None:
            nonlocal size
            if data:
                h.update(data)
                size += len(data)
                out.write(data)

        try:
            while chunk := reader.read(_CHUNK):
                put(comp.compress(chunk) if comp else chunk)
        except (zstandard.ZstdError, BadCompression) as e:
            raise OCIError(f"stored layer {digest} does not decompress: {e}") from None
        if comp:
            put(comp.flush())
        while raw.read(_CHUNK):  # the verifying reader checks the blob at EOF
            pass
    return Blob("sha256:" + h.hexdigest(), size, MEDIA[compression], path=out_path)


def build_manifest(store: Any, image: LocalImage, compression: str,
                   tmp: Path) -> tuple[Blob, Blob, list[Blob]]:  # fmt: skip
    """(manifest, config, layers) blobs of an image in OCI form."""
    if compression not in MEDIA:
        raise OCIError(f"unknown compression {compression!r}: zstd, gzip or none")
    layers = [layer_blob(store, d, compression, tmp) for d, _ in image.layers]
    cfg = canonical_json(image.config_doc())
    config = Blob("sha256:" + hashlib.sha256(cfg).hexdigest(), len(cfg), cl.OCI_CONFIG, data=cfg)
    manifest = {
        "schemaVersion": 2, "mediaType": cl.OCI_MANIFEST,
        "config": {"mediaType": cl.OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size}
                   for b in layers],
    }  # fmt: skip
    mb = canonical_json(manifest)
    return Blob("sha256:" + hashlib.sha256(mb).hexdigest(), len(mb), cl.OCI_MANIFEST,
                data=mb), config, layers  # fmt: skip


# -- export -------------------------------------------------------------------------------------


def export_image(store: Any, image: LocalImage, dest: Path, *, fmt: str = "oci",
                 ref_name: str = "latest", repo_tag: str | None = None,
                 compression: str | None = None) -> str:  # fmt: skip
    """Write `image` to `dest`: an OCI layout (a folder, or a tar when `dest` ends in .tar) or
    a docker-archive tar (`fmt="docker"`, what `docker load`/`podman load` read). Returns the
    manifest digest (OCI) or the config digest (docker: the image ID). Written to a temp
    name and renamed: an interrupted export leaves nothing under `dest`."""
    dest = Path(dest)
    _check_dest(dest, archive=fmt == "docker" or dest.suffix == ".tar")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-") as tmpd:
        tmp = Path(tmpd)
        if fmt == "docker":
            digest = _write_docker_archive(store, image, tmp / "out.tar", repo_tag or
                                           f"localhost/image:{ref_name}", tmp)  # fmt: skip
            os.replace(tmp / "out.tar", dest)
            return digest
        if fmt != "oci":
            raise OCIError(f"unknown export format {fmt!r}: oci or docker")
        manifest, config, layers = build_manifest(store, image, compression or "zstd", tmp)
        index = {"schemaVersion": 2, "mediaType": cl.OCI_INDEX, "manifests": [
            {"mediaType": cl.OCI_MANIFEST, "digest": manifest.digest, "size": manifest.size,
             "annotations": {REF_NAME: ref_name}}]}  # fmt: skip
        files: list[tuple[str, Blob]] = [
            ("oci-layout", _data(canonical_json({"imageLayoutVersion": "1.0.0"}))),
            ("index.json", _data(canonical_json(index))),
        ]
        for b in (manifest, config, *layers):
            files.append((f"blobs/sha256/{b.digest.split(':')[1]}", b))
        if dest.suffix == ".tar":
            _write_tar(tmp / "out.tar", files)
            os.replace(tmp / "out.tar", dest)
        else:
            out = tmp / "layout"
            for name, b in files:
                p = out / name
                p.parent.mkdir(parents=True, exist_ok=True)
                if b.path is not None and b.path.parent == tmp:
                    os.replace(b.path, p)
                elif b.path is not None:
                    shutil.copyfile(b.path, p)
                else:
                    p.write_bytes(b.data or b"")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(out, dest)
        return manifest.digest


def _check_dest(dest: Path, *, archive: bool) -> None:
    """An export replaces an earlier export at `dest`, never anything else: a folder that is
    not an OCI layout (`-o .`, `-o ~/project`) would be deleted whole."""
    if not (dest.exists() or dest.is_symlink()):
        return
    if archive:
        if dest.is_dir() and not dest.is_symlink():
            raise OCIError(f"{dest}: is a folder; an archive is written to a file (name another "
                           "path, or drop .tar for an OCI layout folder)")  # fmt: skip
        return
    if dest.is_symlink() or not dest.is_dir():
        raise OCIError(f"{dest}: exists and is not a folder; an OCI layout is a folder (end the "
                       "path in .tar for an archive)")  # fmt: skip
    if any(dest.iterdir()) and not (dest / "oci-layout").is_file():
        raise OCIError(f"{dest}: a folder that is not empty and not an OCI image layout; "
                       "not replaced (name a new or empty folder)")  # fmt: skip


def _data(data: bytes) -> Blob:
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), "", data=data)


def _write_tar(path: Path, files: list[tuple[str, Blob]]) -> None:
    dirs: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, b in sorted(files, key=lambda f: f[0]):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = _tarinfo(d + "/", tarfile.DIRTYPE, 0o755)
                    tf.addfile(ti)
            ti = _tarinfo(name, tarfile.REGTYPE, 0o644)
            ti.size = b.size
            if b.data is not None:
                tf.addfile(ti, io.BytesIO(b.data))
            else:
                assert b.path is not None
                with open(b.path, "rb") as f:
                    tf.addfile(ti, f)


def _tarinfo(name: str, typ: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name.rstrip("/"))
    ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = typ, mode, 0, 0, 0, "", ""
    return ti


def _write_docker_archive(store: Any, image: LocalImage, path: Path, repo_tag: str,
                          tmp: Path) -> str:  # fmt: skip
    """`docker save`'s format: manifest.json, the config as <hex>.json, layers uncompressed
    as <diff_id hex>/layer.tar."""
    blobs = [layer_blob(store, d, "none", tmp) for d, _ in image.layers]
    for b, (_, diff_id) in zip(blobs, image.layers, strict=True):
        if b.digest != diff_id:
            raise OCIError(f"stored layer unpacks to {b.digest}, but the image says {diff_id}")
    cfg = canonical_json(image.config_doc())
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    layer_names = [f"{b.digest.split(':')[1]}/layer.tar" for b in blobs]
    manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": [repo_tag], "Layers": layer_names}]
    files = [("manifest.json", _data(canonical_json(manifest))),
             (f"{cfg_hex}.json", _data(cfg))]  # fmt: skip
    repo, _, tag = repo_tag.rpartition(":")
    if repo and "/" not in tag:
        files.append(
            (
                "repositories",
                _data(
                    canonical_json(
                        {repo: {tag: blobs[-1].digest.split(":")[1] if blobs else cfg_hex}}
                    )
                ),
            )
        )
    seen = set()
    for name, b in zip(layer_names, blobs, strict=True):
        if name not in seen:  # the same layer twice in an image is stored once
            seen.add(name)
            files.append((name, b))
    _write_tar(path, files)
    return "sha256:" + cfg_hex


# -- import -------------------------------------------------------------------------------------


class _Source:
    """Files of an OCI layout or archive, from a folder or a tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.names: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError) as e:
                raise OCIError(f"{path}: not a tar archive or OCI layout folder: {e}") from None
            for m in self.tar.getmembers():
                self.names[m.name.lstrip("./").rstrip("/") if m.name != "./" else ""] = m

    def has(self, name: str) -> bool:
        return name in self.names if self.tar else (self.path / name).is_file()

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OCIError(f"{self.path}: {name} is larger than {limit} bytes")
        return data

    def open(self, name: str) -> Any:
        if self.tar is None:
            try:
                return open(self.path / name, "rb")
            except OSError:
                raise OCIError(f"{self.path}: {name} is missing") from None
        m = self.names.get(name)
        f = self.tar.extractfile(m) if m is not None else None
        if f is None:
            raise OCIError(f"{self.path}: {name} is missing")
        return f

    def chunks(self, name: str) -> Iterator[bytes]:
        with self.open(name) as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def import_image(cache: Any, path: Path, *, ref_name: str | None = None,
                 platform: str = "linux/amd64") -> PulledImage:  # fmt: skip
    """Read an OCI layout (folder or tar), a docker-archive or a plain rootfs tarball into the
    layer store. Every blob is checked against its digest and every layer's tar against its
    diff_id and the path rules; nothing is stored for a layer that fails."""
    path = Path(path)
    if not path.exists():
        raise OCIError(f"{path}: no such file or folder")
    src = _Source(path)
    try:
        if src.has("oci-layout") and src.has("index.json"):
            return _import_oci(cache, src, ref_name, platform)
        if src.has("manifest.json") and src.tar is not None:
            return _import_docker(cache, src, ref_name)
        if src.tar is None:
            raise OCIError(f"{path}: a folder without oci-layout and index.json is not an OCI "
                           "image layout")  # fmt: skip
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        # A document of the right JSON but the wrong shape (a field missing, a string where
        # an object belongs): named, not a traceback.
        what = (f"field {e}" if isinstance(e, KeyError) else f"JSON ({e})"
                if isinstance(e, json.JSONDecodeError) else str(e))  # fmt: skip
        raise OCIError(f"{path}: not a valid image layout or archive: missing or malformed "
                       f"{what}") from None  # fmt: skip
    finally:
        src.close()
    return _import_rootfs(cache, path)


def _json(src: _Source, name: str) -> Any:
    try:
        return json.loads(src.read(name))
    except ValueError as e:
        raise OCIError(f"{src.path}: {name} is not JSON: {e}") from None


def _store_layers(cache: Any, label: str, items: list[tuple[Any, str | None, int | None, str,
                                                            str | None]],
                  standalone: bool = False) -> list:  # fmt: skip
    out = []
    for chunks, blob, size, media, diff_id in items:
        info, layer = ingest_layer(cache.store, chunks, blob=blob, size=size, media_type=media,
                                   diff_id=diff_id, label=label,
                                   standalone=standalone)  # fmt: skip
        cache.put(layer_key(layer.blob), info, description=f"imported {label}",
                  meta={"blob": layer.blob, "media_type": media})  # fmt: skip
        out.append(layer)
    return out


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def _blob_name(digest: Any, label: str = "", where: str = "") -> str:
    """blobs/<algo>/<hex> of a digest the layout names; anything else (`sha256:../../x`, a
    path out of the layout) is refused before a file is opened."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise OCIError(f"{label}: {where or 'a descriptor'} names an invalid digest "
                       f"{str(digest)[:80]!r}")  # fmt: skip
    algo, _, hexd = digest.partition(":")
    return f"blobs/{algo}/{hexd}"


def _names(name: str, pick: str) -> bool:
    """Whether an image named `name` in a layout or archive (a tag, NAME:TAG or a full
    reference) is the one `pick` asks for: the same, its last path part, or its tag."""
    return bool(name) and (name == pick or name.endswith(f"/{pick}")
                           or name.rsplit(":", 1)[-1] == pick)  # fmt: skip


def _import_oci(cache: Any, src: _Source, ref_name: str | None, platform: str) -> PulledImage:
    label = str(src.path)
    index = _json(src, "index.json")
    entries = index.get("manifests") or []
    if ref_name is not None:
        entries = [
            m
            for m in entries
            if _names(str((m.get("annotations") or {}).get(REF_NAME, "")), ref_name)
        ]
    if not entries:
        names = [(m.get("annotations") or {}).get(REF_NAME, "?")
                 for m in index.get("manifests") or []]  # fmt: skip
        raise OCIError(f"{label}: no image {ref_name!r} in the layout; it has: "
                       f"{', '.join(names) or 'nothing'}")  # fmt: skip
    if len(entries) > 1 and all(m.get("platform") for m in entries):
        digest = select_platform({"manifests": entries}, platform, label)
        entry = next(m for m in entries if m["digest"] == digest)
    elif len(entries) > 1:
        names = [(m.get("annotations") or {}).get(REF_NAME, m["digest"]) for m in entries]
        raise OCIError(f"{label}: the layout holds several images ({', '.join(names)}); name "
                       "one (PATH:NAME)")  # fmt: skip
    else:
        entry = entries[0]
    data = src.read(_blob_name(entry["digest"], label, "index.json"), cl.MAX_MANIFEST)
    if "sha256:" + hashlib.sha256(data).hexdigest() != entry["digest"]:
        raise OCIError(f"{label}: manifest {entry['digest']} does not match its digest")
    doc = json.loads(data)
    if "manifests" in doc:  # a nested index
        digest = select_platform(doc, platform, label)
        data = src.read(_blob_name(digest, label, "the nested index"), cl.MAX_MANIFEST)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise OCIError(f"{label}: manifest {digest} does not match its digest")
        doc = json.loads(data)
        entry = {"digest": digest}
    cfg_bytes = src.read(_blob_name(doc["config"]["digest"], label, "the manifest's config"))
    if "sha256:" + hashlib.sha256(cfg_bytes).hexdigest() != doc["config"]["digest"]:
        raise OCIError(f"{label}: the image config does not match its digest")
    config = json.loads(cfg_bytes)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(doc.get("layers", [])):
        raise OCIError(f"{label}: the manifest and config disagree on the number of layers")
    layers = _store_layers(cache, label, [
        (src.chunks(_blob_name(d["digest"], label, f"the manifest's layer {i}")), d["digest"],
         int(d["size"]),
         d.get("mediaType", cl.OCI_LAYER), diff_ids[i])
        for i, d in enumerate(doc.get("layers", []))])  # fmt: skip
    return PulledImage(ref=label, name=label, digest=entry["digest"], platform=platform,
                       config=config, layers=layers, tag=ref_name)  # fmt: skip


def _import_docker(cache: Any, src: _Source, ref_name: str | None) -> PulledImage:
    label = str(src.path)
    manifest = _json(src, "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise OCIError(f"{label}: manifest.json lists no images")
    entry = manifest[0]
    if ref_name is not None:
        found = [m for m in manifest
                 if any(_names(t, ref_name) for t in m.get("RepoTags") or [])]  # fmt: skip
        if not found:
            raise OCIError(f"{label}: no image {ref_name!r} in the archive")
        entry = found[0]
    elif len(manifest) > 1:
        raise OCIError(f"{label}: the archive holds {len(manifest)} images; name one")
    cfg_bytes = src.read(entry["Config"])
    config = json.loads(cfg_bytes)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(entry.get("Layers", [])):
        raise OCIError(f"{label}: manifest.json and the config disagree on the number of layers")
    items = []
    for i, name in enumerate(entry["Layers"]):
        media = _sniff(src, name)
        blob = diff_ids[i] if media == cl.OCI_LAYER else None
        items.append((src.chunks(name), blob, None, media, diff_ids[i]))
    layers = _store_layers(cache, label, items)
    digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    return PulledImage(ref=label, name=label, digest=digest, platform="linux/amd64",
                       config=config, layers=layers, tag=ref_name)  # fmt: skip


def _sniff(src: _Source, name: str) -> str:
    with src.open(name) as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return cl.OCI_LAYER_GZIP
    if head == b"\x28\xb5\x2f\xfd":
        return cl.OCI_LAYER_ZSTD
    return cl.OCI_LAYER


def _import_rootfs(cache: Any, path: Path) -> PulledImage:
    """A plain root filesystem tarball (gzip, zstd or none) as a one-layer image."""
    label = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    media = (cl.OCI_LAYER_GZIP if head[:2] == b"\x1f\x8b" else cl.OCI_LAYER_ZSTD
             if head == b"\x28\xb5\x2f\xfd" else cl.OCI_LAYER)  # fmt: skip

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    [layer] = _store_layers(cache, label, [(chunks(), None, None, media, None)], standalone=True)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:"
                                 "/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}  # fmt: skip
    return PulledImage(ref=label, name=label, digest=layer.blob, platform="linux/amd64",
                       config=config, layers=[layer])  # fmt: skip


__all__ = ["LocalImage", "build_manifest", "export_image", "import_image"]
