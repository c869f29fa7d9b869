"""The cache index: key -> layer, and each image's last build (for `--explain`).

SQLite in WAL mode at `<root>/layers-v1/index.db`; every process opens its own connection, writes
are `BEGIN IMMEDIATE` transactions, readers never block writers. The schema is part of the
`layers-v1` format: a change bumps that folder's name instead of migrating.

Invariant (kept by the callers in cache.py): a row is inserted only after its blob is durably in
the store, and a blob is unlinked only after the rows naming it are deleted. A crash in between
leaves an orphan blob (swept by prune), never a row without a blob; a row whose blob is missing
anyway (deleted by hand) is treated as a miss and removed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tlimage.errors import CacheError

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    uncompressed_size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS layers_digest ON layers(digest);
CREATE INDEX IF NOT EXISTS layers_last_used ON layers(last_used);
CREATE TABLE IF NOT EXISTS builds (
    image TEXT PRIMARY KEY,
    built_at REAL NOT NULL,
    steps TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class LayerRecord:
    key: str
    digest: str  # the compressed blob in the store, "xxh3:<hex>"
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # compressed bytes
    uncompressed_size: int
    created_at: float
    last_used: float
    description: str = ""  # the step, for `cache ls` (never part of the key)
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, JSON (e.g. config changes)


@dataclass(frozen=True, slots=True)
class BuildStep:
    """One step of an image's last build: its key and the key's input components."""

    key: str
    inputs: dict[str, Any]


class CacheIndex:
    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect_wal(self.path, timeout)
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise CacheError(
                    f"{self.path}: index schema version {version}, expected {_SCHEMA_VERSION}",
                    hint="this cache was written by another tlimage version; use another "
                    "--cache-dir or remove it",
                )
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def _write(self) -> _Txn:
        return _Txn(self._db)

    # -- layers -------------------------------------------------------------------------------

    def get(self, key: str, *, touch: bool = True) -> LayerRecord | None:
        row = self._db.execute(f"SELECT {_COLS} FROM layers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        rec = _record(row)
        if touch:
            now = time.time()
            with self._write():
                self._db.execute("UPDATE layers SET last_used = ? WHERE key = ?", (now, key))
            rec = _replace_last_used(rec, now)
        return rec

    def put(
        self,
        key: str,
        *,
        digest: str,
        diff_id: str,
        size: int,
        uncompressed_size: int,
        description: str = "",
        meta: dict[str, Any] | None = None,
    ) -> LayerRecord:
        """Insert or replace the row for `key`. Call only once the blob is in the store."""
        now = time.time()
        rec = LayerRecord(
            key, digest, diff_id, size, uncompressed_size, now, now, description, meta or {}
        )
        with self._write():
            self._db.execute(
                f"INSERT OR REPLACE INTO layers ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (*_row(rec),),
            )
        return rec

    def touch(self, keys: Iterable[str], when: float | None = None) -> None:
        when = time.time() if when is None else when
        with self._write():
            self._db.executemany(
                "UPDATE layers SET last_used = ? WHERE key = ?", [(when, k) for k in keys]
            )

    def delete_keys(self, keys: Iterable[str]) -> int:
        with self._write():
            cur = self._db.executemany("DELETE FROM layers WHERE key = ?", [(k,) for k in keys])
        return cur.rowcount

    def delete_digest(self, digest: str) -> int:
        """Forget every key whose layer is this blob; returns how many."""
        with self._write():
            cur = self._db.execute("DELETE FROM layers WHERE digest = ?", (digest,))
        return cur.rowcount

    def keys_for_digest(self, digest: str) -> list[str]:
        rows = self._db.execute("SELECT key FROM layers WHERE digest = ? ORDER BY key", (digest,))
        return [r[0] for r in rows]

    def records(self) -> list[LayerRecord]:
        """Every row, most recently used first."""
        rows = self._db.execute(f"SELECT {_COLS} FROM layers ORDER BY last_used DESC, key")
        return [_record(r) for r in rows]

    def digests(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT digest FROM layers")}

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM layers").fetchone()[0]

    # -- builds -------------------------------------------------------------------------------

    def record_build(self, image: str, steps: Sequence[BuildStep | tuple[str, dict]]) -> None:
        """Remember the keys and key inputs of `image`'s latest build (replacing the previous)."""
        payload = [
            {"key": s.key, "inputs": s.inputs}
            if isinstance(s, BuildStep)
            else {"key": s[0], "inputs": s[1]}
            for s in steps
        ]
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        with self._write():
            self._db.execute(
                "INSERT OR REPLACE INTO builds (image, built_at, steps) VALUES (?,?,?)",
                (image, time.time(), text),
            )

    def last_build(self, image: str) -> list[BuildStep] | None:
        row = self._db.execute("SELECT steps FROM builds WHERE image = ?", (image,)).fetchone()
        if row is None:
            return None
        return [BuildStep(s["key"], s["inputs"]) for s in json.loads(row[0])]


def connect_wal(path: Path, timeout: float) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with `synchronous=NORMAL`.

    NORMAL in WAL mode: a commit survives a killed process; after a power loss the last commits
    may be lost, which only turns hits into misses. Switching to WAL (or recovering the WAL of a
    killed process) can report "database is locked" without consulting the busy timeout, so
    that step is retried here until `timeout`.
    """
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise CacheError(f"{path}: database stayed locked for {timeout:g}s") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


_COLS = "key, digest, diff_id, size, uncompressed_size, created_at, last_used, description, meta"


def _record(row: tuple) -> LayerRecord:
    *head, meta = row
    return LayerRecord(*head, meta=json.loads(meta) if meta else {})


def _row(rec: LayerRecord) -> tuple:
    return (
        rec.key,
        rec.digest,
        rec.diff_id,
        rec.size,
        rec.uncompressed_size,
        rec.created_at,
        rec.last_used,
        # Display text: bytes of a non-UTF-8 Dockerfile (surrogate escapes) shown replaced.
        rec.description.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        json.dumps(rec.meta, sort_keys=True, separators=(",", ":")),
    )


def _replace_last_used(rec: LayerRecord, when: float) -> LayerRecord:
    return replace(rec, last_used=when)


class _Txn:
    """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on error (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
