import os

import pytest

from tlimage.cache.cache import LayerCache, parse_size
from tlimage.cache.store import CorruptBlob
from tlimage.cache.testing import Entry, make_tree, snapshot_tree
from tlimage.errors import CacheError


@pytest.fixture
def cache(tmp_path):
    with LayerCache(tmp_path / "cache", on_wait=None) as c:
        yield c


def tree(path, seed, size=1000):
    make_tree(path, [Entry("file", f"f{seed}", bytes([seed % 256]) * size), Entry("dir", "d")])
    return path


def test_store_lookup_apply(cache, tmp_path):
    src = tree(tmp_path / "src", 1)
    with cache.session():
        assert cache.lookup("k") is None
        rec = cache.store_dir("k", src, description="COPY . /app")
        got = cache.lookup("k", verify=True)
        assert got is not None and got.digest == rec.digest
        cache.apply(got, tmp_path / "dest")
    assert snapshot_tree(tmp_path / "dest") == snapshot_tree(src)
    [entry] = cache.ls()
    assert entry.key == "k" and entry.description == "COPY . /app" and not entry.shared
    assert cache.usage().bytes == rec.size


def test_lookup_drops_a_missing_or_damaged_blob(cache, tmp_path):
    rec = cache.store_dir("k", tree(tmp_path / "src", 1))
    cache.store.blob_path(rec.digest).write_bytes(b"short")
    assert cache.lookup("k") is None  # size mismatch: a miss, and the row is gone
    assert cache.index.get("k", touch=False) is None
    rec = cache.store_dir("k", tree(tmp_path / "src", 1))
    path = cache.store.blob_path(rec.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.lookup("k") is not None  # same size: only a full verify can tell
    assert cache.lookup("k", verify=True) is None
    assert not cache.store.has(rec.digest)


def test_apply_of_a_corrupt_blob_raises_and_forgets_it(cache, tmp_path):
    rec = cache.store_dir("k", tree(tmp_path / "src", 1, size=100_000))
    path = cache.store.blob_path(rec.digest)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlob):
        cache.apply(rec, tmp_path / "dest")
    assert cache.lookup("k") is None


def test_identical_layers_share_a_blob(cache, tmp_path):
    a = cache.store_dir("a", tree(tmp_path / "one", 7))
    b = cache.store_dir("b", tree(tmp_path / "two", 7))
    assert a.digest == b.digest
    assert all(e.shared for e in cache.ls())
    assert cache.usage().blobs == 1 and cache.usage().bytes == a.size


def test_prune_lru_keeps_recent_and_counts_shared_blobs_once(cache, tmp_path):
    recs = {}
    for i, key in enumerate(["old", "mid", "new"]):
        recs[key] = cache.store_dir(key, tree(tmp_path / key, i, size=50_000 + i))
    cache.store_dir("new-alias", tree(tmp_path / "alias", 2, size=50_002))  # same blob as "new"
    cache.index.touch(["old"], when=1)
    cache.index.touch(["mid"], when=2)
    cache.index.touch(["new", "new-alias"], when=3)
    keep = recs["new"].size + recs["mid"].size
    result = cache.prune(keep_storage=keep)
    assert result.removed_entries == 1 and result.removed_blobs == 1
    assert result.freed_bytes == recs["old"].size
    assert result.remaining_bytes == keep
    assert sorted(e.key for e in cache.ls()) == ["mid", "new", "new-alias"]
    assert not cache.store.has(recs["old"].digest)
    result = cache.prune(keep_storage=0)
    assert result.removed_entries == 3 and result.removed_blobs == 2 and result.remaining_bytes == 0
    assert cache.ls() == [] and list(cache.store.iter_digests()) == []


def test_prune_sweeps_orphans_temp_files_and_dangling_rows(cache, tmp_path):
    rec = cache.store_dir("kept", tree(tmp_path / "kept", 1))
    orphan = cache.store.put_bytes(b"blob without a row")
    (cache.store.blobs_dir / ".tmp-999999999-abc").write_bytes(b"partial")
    gone = cache.store_dir("dangling", tree(tmp_path / "gone", 2))
    os.unlink(cache.store.blob_path(gone.digest))
    result = cache.prune(keep_storage=10**12)
    assert result.swept_temp_files == 1 and result.swept_orphan_blobs == 1
    assert result.removed_entries == 0
    assert not cache.store.has(orphan.digest)
    assert [e.key for e in cache.ls()] == ["kept"]
    assert cache.store.has(rec.digest)


def test_put_requires_the_blob(cache, tmp_path):
    from tlimage.cache.layer import LayerInfo

    fake = LayerInfo("xxh3:" + "0" * 32, "sha256:" + "0" * 64, 10, 20, 1)
    with pytest.raises(CacheError, match="not in the store"):
        cache.put("k", fake)


def test_explain_records(cache):
    cache.record_build("app", [("k1", {"step": "RUN a"})])
    assert cache.last_build("app")[0].inputs == {"step": "RUN a"}


def test_default_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(tmp_path / "envcache"))
    with LayerCache() as c:
        assert c.root == tmp_path / "envcache"
        assert (tmp_path / "envcache" / "CACHEDIR.TAG").is_file()
        assert (tmp_path / "envcache" / "layers-v1" / "index.db").is_file()


@pytest.mark.parametrize(
    "text,value",
    [
        ("1024", 1024),
        ("10GB", 10 * 2**30),
        ("10gib", 10 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5k", 1536),
        ("0", 0),
        (" 2 TB ", 2 * 2**40),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "ten", "10XB", "-1", "1e9"])
def test_parse_size_rejects(bad):
    with pytest.raises(CacheError, match="invalid size"):
        parse_size(bad)


def test_prune_keeps_pinned_blobs_and_reports_deletions(cache, tmp_path):
    a = cache.store_dir("a", tree(tmp_path / "a", 1, size=40_000))
    b = cache.store_dir("b", tree(tmp_path / "b", 2, size=40_001))
    manifest = cache.store.put_bytes(b'{"layers": []}')  # no row names it
    stray = cache.store.put_bytes(b"really an orphan")
    deleted = []
    result = cache.prune(
        keep_storage=0, keep_digests=[a.digest, manifest.digest], on_delete=deleted.append
    )
    assert sorted(deleted) == sorted([b.digest, stray.digest])
    assert [e.key for e in cache.ls()] == ["a"]
    assert cache.store.has(a.digest) and cache.store.has(manifest.digest)
    assert result.remaining_bytes == a.size + manifest.size
    assert result.removed_entries == 1 and result.swept_orphan_blobs == 1
