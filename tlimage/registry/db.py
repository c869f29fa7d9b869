"""The registry database. See the package docstring for the contract."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from tlimage import _layout
from tlimage._paths import state_dir
from tlimage._sqlite import connection
from tlimage.errors import RegistryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    project     TEXT NOT NULL,
    name        TEXT NOT NULL,
    tag         TEXT NOT NULL,
    image_id    TEXT NOT NULL,
    manifest    TEXT NOT NULL,
    source      TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (project, name, tag)
);
"""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def parse_ref(ref: str) -> tuple[str, str]:
    """`name[:tag]` -> (name, tag), tag defaulting to `latest`."""
    name, sep, tag = ref.partition(":")
    tag = tag if sep else "latest"
    if not _NAME_RE.fullmatch(name) or not _TAG_RE.fullmatch(tag):
        raise RegistryError(
            f"invalid image reference {ref!r}: expected NAME[:TAG] of letters, digits, '.', '_', "
            "'-'"
        )
    return name, tag


@dataclass(frozen=True)
class LayerRef:
    digest: str  # of the compressed blob in the layer store
    diff_id: str  # of the uncompressed tar
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a registered image is: layers bottom to top, and the runtime config."""

    layers: tuple[LayerRef, ...]
    config: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    ir_digest: str = ""

    def image_id(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.to_bytes())

    def to_bytes(self) -> bytes:
        obj = {
            "layers": [asdict(layer) for layer in self.layers],
            "config": self.config,
            "base": self.base,
            "ir_digest": self.ir_digest,
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Manifest:
        obj = json.loads(data)
        return cls(
            layers=tuple(LayerRef(**layer) for layer in obj["layers"]),
            config=obj["config"],
            base=obj.get("base", ""),
            ir_digest=obj.get("ir_digest", ""),
        )


@dataclass(frozen=True)
class ImageRecord:
    project: str
    name: str
    tag: str
    image_id: str
    manifest: Manifest
    source: str | None
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.manifest.layers)


class Registry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _layout.REGISTRY_DB.under(state_dir())

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = connection(self.path, _SCHEMA, synchronous="FULL")
        try:
            yield conn
        finally:
            if conn.in_transaction:  # left by an error between BEGIN and COMMIT
                conn.rollback()

    def register(
        self, project: str, name: str, tag: str, manifest: Manifest, source: str | None = None
    ) -> ImageRecord:
        parse_ref(f"{name}:{tag}")
        rec = ImageRecord(project, name, tag, manifest.image_id(), manifest, source, time.time())
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                (project, name, tag, rec.image_id, manifest.to_bytes().decode(), source,
                 rec.created_at),
            )  # fmt: skip
            db.execute("COMMIT")
        return rec

    def get(self, project: str, ref: str) -> ImageRecord:
        name, tag = parse_ref(ref)
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM images WHERE project=? AND name=? AND tag=?", (project, name, tag)
            ).fetchone()
        if row is None:
            known = ", ".join(r.ref for r in self.list(project)) or "none"
            raise RegistryError(
                f"no image {name}:{tag} in project {project!r}; registered: {known}",
                hint="build it with `tl sbx image create FILE`",
            )
        return _record(row)

    def find(self, project: str, ref: str) -> ImageRecord | None:
        try:
            return self.get(project, ref)
        except RegistryError:
            return None

    def taken(self, project: str, ref: str, source: str | None) -> ImageRecord | None:
        """The image registered as `ref` when it came from another source than `source` (a
        different image file, registry reference or archive; a sandbox snapshot): the name is
        then taken, and registering there needs the user's word (`--replace`)."""
        rec = self.find(project, ref)
        return None if rec is None or same_source(rec.source, source) else rec

    def list(self, project: str | None = None) -> list[ImageRecord]:
        with self._db() as db:
            if project is None:
                rows = db.execute("SELECT * FROM images ORDER BY project, name, tag").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM images WHERE project=? ORDER BY name, tag", (project,)
                ).fetchall()
        return [_record(r) for r in rows]

    def remove(self, project: str, ref: str) -> ImageRecord:
        rec = self.get(project, ref)
        with self._db() as db:
            db.execute(
                "DELETE FROM images WHERE project=? AND name=? AND tag=?",
                (project, rec.name, rec.tag),
            )
        return rec

    def referenced_layers(self) -> set[str]:
        """Every layer digest some registered image needs (prune keeps them)."""
        return {layer.digest for rec in self.list() for layer in rec.manifest.layers}


def _record(row: tuple[Any, ...]) -> ImageRecord:
    project, name, tag, image_id, manifest, source, created_at = row
    return ImageRecord(
        project, name, tag, image_id, Manifest.from_bytes(manifest), source, created_at
    )


def same_source(old: str | None, new: str | None) -> bool:
    """Whether two images' sources are one: the same text, or paths of the same file."""
    if old == new:
        return True
    if old is None or new is None or old.startswith("sandbox "):
        return False
    return Path(old).resolve() == Path(new).resolve()
