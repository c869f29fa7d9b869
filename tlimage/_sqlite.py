"""SQLite connections kept open, one per thread and database file (the runtime's state and the
image registry): opening one per query cost the WAL pragma and the schema script each time,
and closing the last connection of a WAL database checkpoints it and removes its WAL file
(fsyncs included; ~20 ms on a busy disk, several per sandbox create)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from tlimage._private import private_dir

_local = threading.local()


def connection(path: Path, schema: str, *, synchronous: str,
               named_rows: bool = False) -> sqlite3.Connection:  # fmt: skip
    """This thread's connection to the WAL database at `path` (autocommit, `schema` applied
    once, `PRAGMA synchronous` as given; rows as sqlite3.Row with `named_rows`, else tuples).
    A connection is opened
    again when the file at `path` is another one (removed and made anew) or in a forked
    child, which never uses its parent's."""
    conns = getattr(_local, "conns", None)
    if conns is None or _local.pid != os.getpid():
        conns = _local.conns = {}
        _local.pid = os.getpid()
    key = str(path)
    try:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        ident = None
    have = conns.get(key)
    if have is not None and ident is not None and have[1] == ident:
        return have[0]
    if have is not None:
        have[0].close()
        del conns[key]
    private_dir(path.parent)  # the state root (names of images, sandboxes) or a cache bucket
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        if named_rows:
            conn.row_factory = sqlite3.Row
        _wal(conn)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.executescript(schema)
        st = os.stat(path)
    except BaseException:
        conn.close()
        raise
    conns[key] = (conn, (st.st_dev, st.st_ino))
    return conn


def _wal(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Puts the database in WAL mode. Changing the journal mode takes an exclusive lock and
    SQLite answers "database is locked" at once, without its busy handler, while another
    process is creating or switching the same new database; so this waits, as every other
    statement does, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
