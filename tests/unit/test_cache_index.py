import time

import pytest

from tlimage.cache.index import BuildStep, CacheIndex
from tlimage.errors import CacheError


def put(index, key, digest="xxh3:" + "a" * 32, size=10, **kw):
    return index.put(
        key, digest=digest, diff_id="sha256:" + "0" * 64, size=size, uncompressed_size=20, **kw
    )


def test_put_get_roundtrip(tmp_path):
    index = CacheIndex(tmp_path / "index.db")
    rec = put(index, "k1", description="RUN make", meta={"env": {"A": "1"}})
    got = index.get("k1", touch=False)
    assert got == rec
    assert got.meta == {"env": {"A": "1"}} and got.description == "RUN make"
    assert index.get("nope") is None
    assert len(index) == 1


def test_get_touches_last_used(tmp_path):
    index = CacheIndex(tmp_path / "index.db")
    rec = put(index, "k1")
    time.sleep(0.01)
    got = index.get("k1")
    assert got.last_used > rec.last_used
    assert index.get("k1", touch=False).last_used == got.last_used


def test_records_order_and_digest_queries(tmp_path):
    index = CacheIndex(tmp_path / "index.db")
    put(index, "old", digest="xxh3:" + "1" * 32)
    put(index, "mid", digest="xxh3:" + "2" * 32)
    put(index, "new", digest="xxh3:" + "2" * 32)
    index.touch(["old"], when=1.0)
    index.touch(["mid"], when=2.0)
    index.touch(["new"], when=3.0)
    assert [r.key for r in index.records()] == ["new", "mid", "old"]
    assert index.keys_for_digest("xxh3:" + "2" * 32) == ["mid", "new"]
    assert index.digests() == {"xxh3:" + "1" * 32, "xxh3:" + "2" * 32}
    assert index.delete_digest("xxh3:" + "2" * 32) == 2
    assert [r.key for r in index.records()] == ["old"]


def test_shared_between_connections(tmp_path):
    a = CacheIndex(tmp_path / "index.db")
    b = CacheIndex(tmp_path / "index.db")
    put(a, "k")
    assert b.get("k") is not None


def test_last_build_for_explain(tmp_path):
    index = CacheIndex(tmp_path / "index.db")
    assert index.last_build("app") is None
    index.record_build(
        "app", [("k1", {"step": "FROM debian"}), BuildStep("k2", {"env": {"A": "1"}})]
    )
    assert index.last_build("app") == [
        BuildStep("k1", {"step": "FROM debian"}),
        BuildStep("k2", {"env": {"A": "1"}}),
    ]
    index.record_build("app", [("k3", {})])
    assert index.last_build("app") == [BuildStep("k3", {})]


def test_foreign_schema_version_is_refused(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(CacheError, match="schema version 99"):
        CacheIndex(tmp_path / "index.db")
