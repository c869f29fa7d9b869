"""Sandbox state: one SQLite database, `<state dir>/runtime-v1.db` (WAL).

Every status change is a compare-and-swap (`UPDATE ... WHERE status IN (...)`), so two CLI
processes racing on one sandbox cannot both win; the loser gets a `RuntimeError_` naming the
state it found. A transitional status (Pending, Snapshotting, Suspending) records which process
owns it (`op_pid`, `op_start`); reconcile rolls it back when that process is gone.

    Pending ──> Running ──> Snapshotting ──> Running
       │           │  └───> Suspending ───> Suspended ──> Running (resume)
       │           │                          └──> Snapshotting ──> Suspended
       └───────────┴──────────────────────────────┴──> Terminated   (from any state)
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from tlimage import _layout
from tlimage._paths import state_dir
from tlimage._sqlite import connection
from tlimage.errors import RuntimeError_

DB_NAME = _layout.RUNTIME_DB.path


class Status(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SNAPSHOTTING = "Snapshotting"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    TERMINATED = "Terminated"


LIVE = (Status.PENDING, Status.RUNNING, Status.SNAPSHOTTING, Status.SUSPENDING,
        Status.SUSPENDED)  # fmt: skip
TRANSITIONAL = (Status.PENDING, Status.SNAPSHOTTING, Status.SUSPENDING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id            TEXT PRIMARY KEY,
    project       TEXT NOT NULL,
    name          TEXT,
    status        TEXT NOT NULL,
    backend       TEXT NOT NULL,
    image_ref     TEXT NOT NULL,
    image_id      TEXT NOT NULL,
    cpus          REAL NOT NULL,
    memory_mb     INTEGER NOT NULL,
    timeout       REAL,
    entrypoint    TEXT,
    env           TEXT NOT NULL,
    workdir       TEXT,
    user          TEXT,
    network       INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    started_at    REAL,
    terminated_at REAL,
    deadline      REAL,
    suspended_at  REAL,
    reason        TEXT,
    exit_code     INTEGER,
    pids          TEXT NOT NULL,
    boot_id       TEXT NOT NULL,
    dir           TEXT NOT NULL,
    run_dir       TEXT NOT NULL,
    cache_dir     TEXT,
    op_pid        INTEGER,
    op_start      INTEGER,
    prev_status   TEXT,
    source        TEXT,
    snapshots     INTEGER NOT NULL DEFAULT 0,
    extra         TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_name ON sandboxes(project, name)
    WHERE name IS NOT NULL;
"""

_JSON_COLUMNS = ("entrypoint", "env", "pids", "extra")


@dataclass
class SandboxRecord:
    """One row. `pids` maps a role ("init", "unshare", "shim", "qemu") to [pid, start time in
    clock ticks since boot]; a pid is only trusted together with its start time and `boot_id`.
    `deadline` is wall-clock seconds; suspending moves it later by the time spent suspended
    (a timeout limits running time)."""

    id: str
    project: str
    name: str | None
    status: Status
    backend: str
    image_ref: str
    image_id: str
    cpus: float
    memory_mb: int
    timeout: float | None
    entrypoint: list[str] | None
    env: list[str]
    workdir: str | None
    user: str | None
    network: bool
    created_at: float
    started_at: float | None
    terminated_at: float | None
    deadline: float | None
    suspended_at: float | None
    reason: str | None
    exit_code: int | None
    pids: dict[str, list[int]]
    boot_id: str
    dir: str
    run_dir: str
    cache_dir: str | None
    op_pid: int | None = None
    op_start: int | None = None
    prev_status: str | None = None
    source: str | None = None
    snapshots: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def persistent(self) -> bool:
        """Named sandboxes keep their filesystem after they end and can be suspended."""
        return self.name is not None

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        for c in _JSON_COLUMNS:
            row[c] = None if row[c] is None else json.dumps(row[c])
        row["status"] = str(self.status)
        row["network"] = int(self.network)
        return row

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SandboxRecord:
        d = dict(row)
        for c in _JSON_COLUMNS:
            d[c] = None if d[c] is None else json.loads(d[c])
        d["status"] = Status(d["status"])
        d["network"] = bool(d["network"])
        return cls(**d)


class StateDB:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / DB_NAME

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # NORMAL in WAL mode: a commit survives a crash of any process; only a power loss may
        # drop the last ones, and a new boot ends every sandbox anyway (reconcile). FULL cost
        # ~5 ms of fsync per transition, two per create.
        conn = connection(self.path, _SCHEMA, synchronous="NORMAL", named_rows=True)
        try:
            yield conn
        finally:
            if conn.in_transaction:  # left by an error between BEGIN and COMMIT
                conn.rollback()

    def insert(self, rec: SandboxRecord) -> None:
        row = rec.to_row()
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._db() as db:
            try:
                db.execute(f"INSERT INTO sandboxes ({cols}) VALUES ({marks})", row)
            except sqlite3.IntegrityError:
                other = self.find_name(rec.project, rec.name) if rec.name else None
                if other is not None:
                    raise RuntimeError_(
                        f"a sandbox named {rec.name!r} already exists in project "
                        f"{rec.project!r} ({other.id}, {other.status})",
                        hint=f"remove it first: tl sbx rm {rec.name}",
                    ) from None
                raise

    def get(self, sid: str) -> SandboxRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE id=?", (sid,)).fetchone()
        return None if row is None else SandboxRecord.from_row(row)

    def find_name(self, project: str, name: str) -> SandboxRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE project=? AND name=?",
                             (project, name)).fetchone()  # fmt: skip
        return None if row is None else SandboxRecord.from_row(row)

    def find_prefix(self, prefix: str) -> list[SandboxRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM sandboxes WHERE id LIKE ? ESCAPE '\\'",
                              (_like_escape(prefix) + "%",)).fetchall()  # fmt: skip
        return [SandboxRecord.from_row(r) for r in rows]

    def list(self, project: str | None = None,
             statuses: Iterable[Status] | None = None) -> list[SandboxRecord]:  # fmt: skip
        q, args = "SELECT * FROM sandboxes", []
        where = []
        if project is not None:
            where.append("project=?")
            args.append(project)
        if statuses is not None:
            st = [str(s) for s in statuses]
            where.append(f"status IN ({', '.join('?' * len(st))})")
            args += st
        if where:
            q += " WHERE " + " AND ".join(where)
        with self._db() as db:
            rows = db.execute(q + " ORDER BY created_at", args).fetchall()
        return [SandboxRecord.from_row(r) for r in rows]

    def transition(self, sid: str, expect: Iterable[Status], to: Status,
                   **changes: Any) -> SandboxRecord:  # fmt: skip
        """Moves `sid` from one of `expect` to `to`, applying `changes`, atomically; raises
        RuntimeError_ naming the current status when the sandbox is in none of `expect`."""
        expect = tuple(expect)
        changes["status"] = str(to)
        for c in _JSON_COLUMNS:
            if c in changes and changes[c] is not None:
                changes[c] = json.dumps(changes[c])
        if "network" in changes:
            changes["network"] = int(changes["network"])
        sets = ", ".join(f"{k}=:{k}" for k in changes)
        st = [str(s) for s in expect]
        marks = ", ".join(f":s{i}" for i in range(len(st)))
        params = {**changes, "id": sid, **{f"s{i}": s for i, s in enumerate(st)}}
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"UPDATE sandboxes SET {sets} WHERE id=:id AND status IN ({marks})", params
            )
            row = db.execute("SELECT * FROM sandboxes WHERE id=?", (sid,)).fetchone()
            db.execute("COMMIT")
        if row is None:
            raise RuntimeError_(f"no sandbox {sid}")
        rec = SandboxRecord.from_row(row)
        if cur.rowcount != 1:
            want = " or ".join(str(s) for s in expect)
            raise RuntimeError_(f"sandbox {_label(rec)} is {rec.status}; this needs it {want}")
        return rec

    def update(self, sid: str, **changes: Any) -> None:
        """Changes fields other than the status."""
        for c in _JSON_COLUMNS:
            if c in changes and changes[c] is not None:
                changes[c] = json.dumps(changes[c])
        sets = ", ".join(f"{k}=:{k}" for k in changes)
        with self._db() as db:
            db.execute(f"UPDATE sandboxes SET {sets} WHERE id=:id", {**changes, "id": sid})

    def next_snapshot(self, sid: str) -> int:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE sandboxes SET snapshots = snapshots + 1 WHERE id=?", (sid,))
            n = db.execute("SELECT snapshots FROM sandboxes WHERE id=?", (sid,)).fetchone()[0]
            db.execute("COMMIT")
        return int(n)

    def delete(self, sid: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sandboxes WHERE id=?", (sid,))


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _label(rec: SandboxRecord) -> str:
    return f"{rec.id} ({rec.name})" if rec.name else rec.id


def now() -> float:
    return time.time()


def op_owner() -> dict[str, int]:
    """`op_pid`/`op_start` for a transition owned by this process."""
    from tlimage.sandbox.proc import proc_start

    pid = os.getpid()
    return {"op_pid": pid, "op_start": proc_start(pid) or 0}
