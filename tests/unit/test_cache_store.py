import os
import subprocess
import sys

import pytest
import xxhash

from tlimage.cache.store import (
    CACHEDIR_TAG,
    BlobNotFound,
    BlobStore,
    CorruptBlob,
    default_cache_root,
    parse_digest,
    resolve_cache_root,
)
from tlimage.errors import CacheError


def test_layout_is_versioned_and_tagged(tmp_path):
    store = BlobStore(tmp_path / "c")
    assert store.path == tmp_path / "c" / "layers-v1"
    assert (tmp_path / "c" / "CACHEDIR.TAG").read_text() == CACHEDIR_TAG
    assert CACHEDIR_TAG.startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert store.blobs_dir.is_dir()


def test_default_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TLIMAGE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_root() == tmp_path / "home" / ".cache" / "tlimage"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_root() == tmp_path / "home" / ".cache" / "tlimage"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "tlimage"
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env"
    assert resolve_cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_root(None) == tmp_path / "env"


def test_put_and_read(tmp_path):
    store = BlobStore(tmp_path)
    ref = store.put_bytes(b"hello")
    assert ref.digest == "xxh3:" + xxhash.xxh3_128_hexdigest(b"hello")
    assert ref.size == 5
    assert store.has(ref.digest)
    assert store.size(ref.digest) == 5
    assert store.read_bytes(ref.digest) == b"hello"
    assert list(store.iter_digests()) == [ref.digest]
    assert store.disk_usage() == 5
    # Same bytes again: same name, one file.
    assert store.put_bytes(b"hello") == ref
    assert len(os.listdir(store.blobs_dir)) == 1


def test_a_blob_already_stored_is_kept_and_the_copy_dropped_without_fsync(tmp_path, monkeypatch):
    store = BlobStore(tmp_path)
    ref = store.put_bytes(b"same layer")
    path = store.blob_path(ref.digest)
    inode = os.stat(path).st_ino
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    assert store.put_bytes(b"same layer") == ref
    assert synced == []  # nothing new reached the disk's name space
    assert os.stat(path).st_ino == inode and store.read_bytes(ref.digest) == b"same layer"
    assert os.listdir(store.blobs_dir) == [path.name] and not any(
        n.startswith(".") for n in os.listdir(path.parent))  # fmt: skip
    store.put_bytes(b"another layer")  # a new blob is still fsynced (file and folder)
    assert len(synced) == 2


def test_writer_without_commit_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path)
    with store.writer() as w:
        w.write(b"partial")
    assert os.listdir(store.blobs_dir) == []
    with pytest.raises(RuntimeError):
        with store.writer() as w:
            w.write(b"x")
            raise RuntimeError("boom")
    assert os.listdir(store.blobs_dir) == []


def test_verify_discards_a_corrupt_blob(tmp_path):
    store = BlobStore(tmp_path)
    ref = store.put_bytes(b"good bytes" * 1000)
    path = store.blob_path(ref.digest)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    with pytest.raises(CorruptBlob) as e:
        store.read_bytes(ref.digest)
    assert ref.digest in str(e.value)
    assert not path.exists()
    assert not store.verify(ref.digest)


def test_unverified_read_does_not_hash(tmp_path):
    store = BlobStore(tmp_path)
    ref = store.put_bytes(b"abc")
    store.blob_path(ref.digest).write_bytes(b"xyz")
    assert store.read_bytes(ref.digest, verify=False) == b"xyz"
    assert store.verify(ref.digest) is False
    assert not store.has(ref.digest)


def test_truncated_blob_fails_verification(tmp_path):
    store = BlobStore(tmp_path)
    ref = store.put_bytes(os.urandom(3 << 20))
    os.truncate(store.blob_path(ref.digest), 1 << 20)
    assert store.verify(ref.digest) is False


def test_missing_blob(tmp_path):
    store = BlobStore(tmp_path)
    d = "xxh3:" + "0" * 32
    with pytest.raises(BlobNotFound):
        store.open(d)
    assert store.size(d) is None and not store.has(d)


@pytest.mark.parametrize(
    "bad",
    ["sha256:" + "0" * 32, "xxh3:" + "0" * 31, "xxh3:" + "G" * 32, "xxh3:../../etc/passwd", ""],
)
def test_bad_digests_are_rejected(bad):
    with pytest.raises(CacheError, match="invalid blob digest"):
        parse_digest(bad)


def test_sweep_temp_keeps_live_writers(tmp_path):
    store = BlobStore(tmp_path)
    live = store.writer()
    live.write(b"in progress")
    # A temp file whose writer is dead: a pid that has exited.
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(p.stdout)
    dead = store.blobs_dir / f".tmp-{dead_pid}-deadbeef"
    dead.write_bytes(b"left over")
    assert store.sweep_temp() == 1
    assert not dead.exists()
    assert live._tmp.exists()
    ref = live.commit()
    assert store.read_bytes(ref.digest) == b"in progress"
    other = store.writer()
    assert store.sweep_temp(everything=True) == 1
    other.abort()


def test_package_exports_resolve_lazily():
    import subprocess
    import sys

    import tlimage.cache as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    # importing the package alone does not pull in sqlite3, zstandard or tarfile
    code = "import sys, tlimage.cache; print(sorted(m for m in ('sqlite3', 'zstandard', 'tarfile') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
