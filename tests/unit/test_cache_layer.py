import io
import os
import shutil
import stat
import tarfile

import pytest
import zstandard

from tlimage.cache.layer import (
    OPAQUE_MARKER,
    LayerError,
    apply_layer,
    layer_from_dir,
    layer_from_upper,
    write_tar,
)
from tlimage.cache.store import BlobStore, CorruptBlob
from tlimage.cache.testing import Entry, make_tree, snapshot_tree

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (mknod, chown, trusted xattrs)"
)


def tar_members(store, info):
    data = zstandard.ZstdDecompressor().stream_reader(store.open(info.digest)).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m) for m in tf.getmembers()], data


def test_layer_records_digests_and_sorted_clamped_entries(tmp_path):
    store = BlobStore(tmp_path / "cache")
    src = tmp_path / "src"
    make_tree(
        src,
        [
            Entry("file", "b.txt", b"bee", mode=0o600, uid=1000, gid=1000),
            Entry("dir", "a"),
            Entry("file", "a/z", b"zed", mode=0o755),
            Entry("file", "a-b", b"dash"),
            Entry("symlink", "link", target="a/z"),
            Entry("hardlink", "a/hard", target="b.txt"),
        ],
        mtime=1_700_000_000 * 10**9,
    )
    info = layer_from_dir(src, store, mtime=42)
    assert info.digest.startswith("xxh3:") and info.diff_id.startswith("sha256:")
    assert info.size == store.size(info.digest)
    members, raw = tar_members(store, info)
    import hashlib

    assert info.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert info.uncompressed_size == len(raw)
    names = [n for n, _ in members]
    # depth-first, siblings by bytes: a's children right after a (not after "a-b")
    assert names == ["a", "a/hard", "a/z", "a-b", "b.txt", "link"]
    by = dict(members)
    assert all(m.mtime == 42 for _, m in members)
    assert all(m.uname == "" and m.gname == "" for _, m in members)
    assert by["a/z"].mode == 0o755
    assert by["link"].issym() and by["link"].linkname == "a/z"
    # the first name in walk order holds the data; later names are hard links to it
    assert by["a/hard"].isreg() and by["b.txt"].islnk() and by["b.txt"].linkname == "a/hard"
    if os.geteuid() == 0:
        assert by["a/hard"].uid == 1000 and by["a/hard"].gid == 1000


def test_same_tree_same_bytes_regardless_of_threads(tmp_path):
    store = BlobStore(tmp_path / "cache")
    src = tmp_path / "src"
    make_tree(src, [Entry("file", f"f{i}", os.urandom(1000) * 300) for i in range(5)])
    one = layer_from_dir(src, store, threads=1)
    four = layer_from_dir(src, store, threads=4)
    assert one == four


def test_mtime_and_creation_order_do_not_matter(tmp_path):
    store = BlobStore(tmp_path / "cache")
    entries = [
        Entry("dir", "d", mode=0o750),
        Entry("file", "d/x", b"x"),
        Entry("file", "y", b"y", mode=0o640),
    ]
    make_tree(tmp_path / "one", entries, mtime=1)
    make_tree(tmp_path / "two", list(reversed(entries)), mtime=10**18)
    os.utime(tmp_path / "two" / "d", (5, 5))
    assert layer_from_dir(tmp_path / "one", store) == layer_from_dir(tmp_path / "two", store)
    os.chmod(tmp_path / "two" / "y", 0o644)
    assert layer_from_dir(tmp_path / "one", store) != layer_from_dir(tmp_path / "two", store)


@needs_root
def test_upper_whiteouts_and_opaque(tmp_path):
    store = BlobStore(tmp_path / "cache")
    upper = tmp_path / "upper"
    make_tree(
        upper,
        [
            Entry("whiteout", "gone"),
            Entry("dir", "etc"),
            Entry("whiteout", "etc/old.conf"),
            Entry("opaque", "var/lib"),
            Entry("file", "var/lib/fresh", b"new"),
            Entry("file", "var/lib/-early", b"sorts before the marker by bytes"),
        ],
    )
    info = layer_from_upper(upper, store)
    names = [n for n, _ in tar_members(store, info)[0]]
    assert names == [
        "etc",
        "etc/.wh.old.conf",
        ".wh.gone",
        "var",
        "var/lib",
        "var/lib/" + OPAQUE_MARKER,
        "var/lib/-early",
        "var/lib/fresh",
    ]
    # The whiteout's own name sorts as the entry it replaces ("gone" after "etc").
    whiteout = dict(tar_members(store, info)[0])[".wh.gone"]
    assert whiteout.isreg() and whiteout.size == 0 and whiteout.mode == 0


def test_opaque_dirs_argument_when_xattrs_are_unreadable(tmp_path):
    store = BlobStore(tmp_path / "cache")
    upper = tmp_path / "upper"
    make_tree(upper, [Entry("file", "d/new", b"n")])
    info = layer_from_upper(upper, store, opaque_dirs=["/d/"])
    names = [n for n, _ in tar_members(store, info)[0]]
    assert names == ["d", "d/" + OPAQUE_MARKER, "d/new"]
    with pytest.raises(LayerError, match="not a directory"):
        layer_from_upper(upper, store, opaque_dirs=["missing"])


def test_plain_dir_does_not_interpret_whiteout_names(tmp_path):
    store = BlobStore(tmp_path / "cache")
    src = tmp_path / "src"
    make_tree(src, [Entry("file", "d/.wh.sneaky", b"")])
    with pytest.raises(LayerError, match=r"reserved for OCI whiteouts"):
        layer_from_dir(src, store)


@needs_root
def test_upper_with_redirect_is_refused(tmp_path):
    store = BlobStore(tmp_path / "cache")
    upper = tmp_path / "upper"
    make_tree(upper, [Entry("dir", "moved")])
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(LayerError, match="redirect_dir=off,metacopy=off"):
        layer_from_upper(upper, store)


def test_apply_reproduces_the_tree(tmp_path):
    store = BlobStore(tmp_path / "cache")
    src = tmp_path / "src"
    entries = [
        Entry("dir", "ro", mode=0o555),
        Entry("file", "ro/inside", b"i"),
        Entry("file", "bin/tool", b"#!/bin/sh\n", mode=0o4755),
        Entry("file", "big", os.urandom(3 << 20)),
        Entry("symlink", "abs", target="/etc/passwd"),
        Entry("symlink", "rel", target="../outside"),
        Entry("hardlink", "bin/tool2", target="bin/tool"),
        Entry("fifo", "pipe", mode=0o600),
        Entry("file", "caf\u00e9", b"utf-8 name"),
        Entry("file", "n" * 150, b"long name"),
    ]
    make_tree(src, entries)
    os.setxattr(src / "big", "user.note", b"\x00\xffbinary")
    info = layer_from_dir(src, store)
    dest = tmp_path / "dest"
    with store.open(info.digest, verify=True) as f:
        stats = apply_layer(f, dest)
    assert stats.skipped == []
    assert snapshot_tree(dest) == snapshot_tree(src)
    assert stat.S_IMODE(os.stat(dest / "bin" / "tool").st_mode) == 0o4755


@needs_root
def test_apply_whiteouts_over_lower(tmp_path):
    store = BlobStore(tmp_path / "cache")
    lower = tmp_path / "lower"
    make_tree(
        lower,
        [
            Entry("file", "gone", b"old"),
            Entry("file", "etc/old.conf", b"old"),
            Entry("file", "etc/keep.conf", b"keep"),
            Entry("file", "var/lib/a", b"a"),
            Entry("file", "var/lib/sub/b", b"b"),
        ],
    )
    upper = tmp_path / "upper"
    make_tree(
        upper,
        [
            Entry("whiteout", "gone"),
            Entry("dir", "etc"),
            Entry("whiteout", "etc/old.conf"),
            Entry("opaque", "var/lib"),
            Entry("file", "var/lib/fresh", b"new"),
        ],
    )
    dest = tmp_path / "dest"
    apply_layer(store.blob_path(layer_from_dir(lower, store).digest), dest)
    stats = apply_layer(store.blob_path(layer_from_upper(upper, store).digest), dest)
    assert stats.whiteouts == 3
    assert sorted(snapshot_tree(dest)) == [
        "etc",
        "etc/keep.conf",
        "var",
        "var/lib",
        "var/lib/fresh",
    ]


def _raw_layer(tmp_path, members):
    """A hand-made (possibly hostile) layer: list of (TarInfo, data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    path = tmp_path / "layer.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def _ti(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.linkname = linkname
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return ti, (data if kind == tarfile.REGTYPE else None)


def test_apply_refuses_dotdot(tmp_path):
    layer = _raw_layer(tmp_path, [_ti("../escape", data=b"x")])
    with pytest.raises(LayerError, match=r"leaves the destination"):
        apply_layer(layer, tmp_path / "dest")
    assert not (tmp_path / "escape").exists()


def test_apply_symlink_parents_stay_inside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = _raw_layer(
        tmp_path,
        [
            _ti("evil", tarfile.SYMTYPE, linkname=str(outside)),
            _ti("evil/pwned", data=b"x"),
            _ti("up", tarfile.SYMTYPE, linkname="../../../.."),
            _ti("up/also", data=b"y"),
            _ti("final", tarfile.SYMTYPE, linkname=str(outside / "target")),
            _ti("final", data=b"replaces the link, does not write through it"),
        ],
    )
    dest = tmp_path / "dest"
    apply_layer(layer, dest)
    assert os.listdir(outside) == []
    # absolute symlink targets resolve against the destination, as in a chroot
    assert (dest / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"
    assert (dest / "also").read_bytes() == b"y"
    assert (dest / "final").read_bytes().startswith(b"replaces")


def test_apply_hardlink_must_point_inside_the_layer(tmp_path):
    layer = _raw_layer(tmp_path, [_ti("h", tarfile.LNKTYPE, linkname="../../etc/passwd")])
    with pytest.raises(LayerError, match="leaves the destination"):
        apply_layer(layer, tmp_path / "dest")
    layer = _raw_layer(tmp_path, [_ti("h", tarfile.LNKTYPE, linkname="nothing")])
    with pytest.raises(LayerError, match="has not created"):
        apply_layer(layer, tmp_path / "dest2")


def test_whiteout_does_not_remove_same_layer_entries(tmp_path):
    dest = tmp_path / "dest"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "lower").write_bytes(b"l")
    layer = _raw_layer(
        tmp_path,
        [
            _ti("d", tarfile.DIRTYPE),
            _ti("d/new", data=b"n"),
            _ti("d/" + OPAQUE_MARKER),  # after a child: must not remove it
            _ti("x", data=b"x"),
            _ti(".wh.x"),
        ],
    )
    apply_layer(layer, dest)
    assert sorted(os.listdir(dest / "d")) == ["new"]
    assert (dest / "x").read_bytes() == b"x"


def test_file_replaces_dir_and_dir_replaces_file(tmp_path):
    dest = tmp_path / "dest"
    (dest / "was_dir" / "sub").mkdir(parents=True)
    (dest / "was_file").write_bytes(b"f")
    layer = _raw_layer(
        tmp_path, [_ti("was_dir", data=b"now a file"), _ti("was_file", tarfile.DIRTYPE)]
    )
    apply_layer(layer, dest)
    assert (dest / "was_dir").read_bytes() == b"now a file"
    assert (dest / "was_file").is_dir()


def test_apply_from_corrupt_blob_raises(tmp_path):
    store = BlobStore(tmp_path / "cache")
    src = tmp_path / "src"
    make_tree(src, [Entry("file", "f", b"data" * 1000)])
    info = layer_from_dir(src, store)
    path = store.blob_path(info.digest)
    raw = bytearray(path.read_bytes())
    raw.extend(b"\x00" * 16)  # trailing garbage: still decodes, no longer matches its name
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlob):
        with store.open(info.digest, verify=True) as f:
            apply_layer(f, tmp_path / "dest")
    assert not store.has(info.digest)


def test_uncompressed_write_tar_is_a_valid_tar(tmp_path):
    src = tmp_path / "src"
    make_tree(src, [Entry("file", "a", b"a")])
    buf = io.BytesIO()
    stats = write_tar(src, buf, upper=False)
    assert stats.entries == 1 and stats.uncompressed_size == len(buf.getvalue())
    assert len(buf.getvalue()) % 10240 == 0


def _gzip_members(data: bytes, parts: int) -> bytes:
    """`data` as `parts` gzip members back to back (as pigz and some registries write)."""
    import gzip

    step = max(1, len(data) // parts)
    return b"".join(gzip.compress(data[i : i + step], mtime=0) for i in range(0, len(data), step))


@pytest.mark.parametrize("kind", ["zstd", "gzip", "gzip-members", "gzip-padded", "none"])
def test_stored_layer_read_in_any_compression(tmp_path, kind):
    """A stored layer is read whatever its compression (pulled layers keep the registry's
    gzip bytes): told by its first bytes, through apply, the overlay unpack and open_tar."""
    import hashlib

    from tlimage.cache.layer import open_tar, sniff_compression
    from tlimage.cache.unpacked import unpacked_layer

    src = tmp_path / "src"
    make_tree(src, [Entry("dir", "d"), Entry("file", "d/a", os.urandom(200_000)),
                    Entry("file", "b", b"text\n" * 50_000)])  # fmt: skip
    buf = io.BytesIO()
    stats = write_tar(src, buf, upper=False)
    tar = buf.getvalue()
    blob = {
        "zstd": zstandard.ZstdCompressor().compress(tar),
        "gzip": _gzip_members(tar, 1),
        "gzip-members": _gzip_members(tar, 5),
        "gzip-padded": _gzip_members(tar, 1) + b"\0" * 1024,
        "none": tar,
    }[kind]
    assert sniff_compression(blob[:4]) == kind.split("-")[0]
    store = BlobStore(tmp_path / "cache")
    ref = store.put_bytes(blob)
    with store.open(ref.digest, verify=True) as raw:
        stream, found = open_tar(raw)
        assert found == kind.split("-")[0]
        assert hashlib.sha256(stream.read()).hexdigest() == stats.diff_id.split(":")[1]
    with store.open(ref.digest, verify=True) as raw:
        apply_layer(raw, tmp_path / "dest")
    assert snapshot_tree(tmp_path / "dest") == snapshot_tree(src)
    lower = unpacked_layer(store, ref.digest)
    assert (lower / "d" / "a").read_bytes() == (src / "d" / "a").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_bad_gzip_layer_is_a_layer_error(tmp_path, damage):
    src = tmp_path / "src"
    make_tree(src, [Entry("file", "a", os.urandom(100_000))])
    buf = io.BytesIO()
    write_tar(src, buf, upper=False)
    blob = _gzip_members(buf.getvalue(), 1)
    if damage == "truncated":
        blob = blob[: len(blob) - 5000]
    else:
        blob = blob[:5000] + bytes(b ^ 0x55 for b in blob[5000:5100]) + blob[5100:]
    with pytest.raises(LayerError, match="gzip|tar"):
        apply_layer(io.BytesIO(blob), tmp_path / "dest")


@pytest.mark.parametrize("path", ["overlay", "apply"])
def test_pulled_layer_diff_id_is_checked_on_first_read(tmp_path, path):
    """A pulled blob's diff_id is noted and checked by its first full read: a match clears the
    note; a mismatch discards the blob and says which diff_ids differ."""
    import gzip
    import hashlib

    from tlimage.cache.cache import LayerCache
    from tlimage.cache.layer import LayerInfo, mark_unverified, unverified_diff_id
    from tlimage.cache.unpacked import unpacked_layer, unpacked_root

    src = tmp_path / "src"
    make_tree(src, [Entry("file", "a", b"hello\n")])
    buf = io.BytesIO()
    write_tar(src, buf, upper=False)
    good = "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
    blob = gzip.compress(buf.getvalue(), mtime=0)
    with LayerCache(tmp_path / "cache") as cache:
        store = cache.store
        for expected in (good, "sha256:" + "0" * 64):
            ref = store.put_bytes(blob)
            mark_unverified(store, ref.digest, expected)
            rec = cache.put("k", LayerInfo(ref.digest, expected, ref.size, 0, 0))
            dest = tmp_path / f"dest-{expected[7:12]}"

            def read(ref=ref, rec=rec, dest=dest):
                if path == "overlay":
                    return unpacked_layer(store, ref.digest)
                return cache.apply(rec, dest)

            if expected == good:
                read()
                assert unverified_diff_id(store, ref.digest) is None and store.has(ref.digest)
            else:
                with pytest.raises(LayerError, match="unpacks to .* but its image config says"):
                    read()
                assert not store.has(ref.digest)
                assert unverified_diff_id(store, ref.digest) is None
                assert cache.lookup("k") is None
            shutil.rmtree(unpacked_root(store), ignore_errors=True)
