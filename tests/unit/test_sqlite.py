"""tlimage/_sqlite.py: one kept-open connection per thread and database file, opened again
when the file at the path is another one."""

from __future__ import annotations

import threading
from pathlib import Path

from tlimage._sqlite import connection

SCHEMA = "CREATE TABLE IF NOT EXISTS t (v TEXT);"


def test_one_connection_per_thread_and_file(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    first = connection(db, SCHEMA, synchronous="NORMAL")
    assert connection(db, SCHEMA, synchronous="NORMAL") is first
    assert connection(tmp_path / "b.db", SCHEMA, synchronous="NORMAL") is not first
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(connection(db, SCHEMA, synchronous="NORMAL")))
    t.start()
    t.join()
    assert other and other[0] is not first
    assert first.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_made_anew_at_the_path_is_opened_again(tmp_path: Path) -> None:
    db = tmp_path / "state" / "a.db"
    c = connection(db, SCHEMA, synchronous="NORMAL")
    c.execute("INSERT INTO t VALUES ('old')")
    for p in db.parent.iterdir():  # the folder removed, as a test or a reset does
        p.unlink()
    c2 = connection(db, SCHEMA, synchronous="NORMAL")
    assert c2 is not c
    assert c2.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    c2.execute("INSERT INTO t VALUES ('new')")
    again = connection(db, SCHEMA, synchronous="NORMAL")
    assert again is c2 and again.execute("SELECT v FROM t").fetchall() == [("new",)]
