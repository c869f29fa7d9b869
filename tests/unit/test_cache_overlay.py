"""A real overlayfs mount: the layer of its upper directory, applied over the lower layer,
reproduces the merged view exactly."""

import os
import shutil
import subprocess

import pytest

from tlimage.cache.layer import apply_layer, layer_from_dir, layer_from_upper
from tlimage.cache.store import BlobStore
from tlimage.cache.testing import Entry, make_tree, snapshot_tree

pytestmark = pytest.mark.vm


@pytest.fixture
def overlay(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    make_tree(
        dirs["lower"],
        [
            Entry("file", "etc/os-release", b"ID=test\n"),
            Entry("file", "etc/remove.me", b"bye"),
            Entry("file", "usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
            Entry("file", "var/lib/pkg/a", b"a"),
            Entry("file", "var/lib/pkg/sub/b", b"b"),
            Entry("dir", "opt/old"),
            Entry("file", "opt/old/x", b"x"),
            Entry("symlink", "lib", target="usr/lib"),
            Entry("file", "usr/lib/libc.so", b"\x7fELF"),
        ],
    )
    opts = (
        f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']},"
        "redirect_dir=off,metacopy=off"
    )
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {r.stderr.strip()}")
    try:
        yield dirs
    finally:
        subprocess.run(["umount", "-l", str(dirs["merged"])], check=False)


def test_upper_layer_over_lower_equals_merged(overlay, tmp_path):
    m = overlay["merged"]
    os.unlink(m / "etc/remove.me")  # whiteout
    (m / "etc/os-release").write_bytes(b"ID=changed\n")  # copy-up
    os.chmod(m / "usr/bin/tool", 0o700)  # metadata-only copy-up
    shutil.rmtree(m / "var/lib/pkg")  # whiteout of a dir ...
    (m / "var/lib/pkg").mkdir()  # ... recreated: opaque
    (m / "var/lib/pkg/new").write_bytes(b"fresh")
    shutil.rmtree(m / "opt/old")
    (m / "lib/libnew.so").write_bytes(b"through the symlink")  # lands in usr/lib
    os.link(m / "etc/os-release", m / "etc/os-release.bak")
    os.symlink("/nowhere", m / "dangling")
    os.mkfifo(m / "fifo")
    expected = snapshot_tree(m)
    subprocess.run(["umount", str(m)], check=True)

    store = BlobStore(tmp_path / "cache")
    base = layer_from_dir(overlay["lower"], store)
    diff = layer_from_upper(overlay["upper"], store)
    dest = tmp_path / "dest"
    apply_layer(store.open(base.digest, verify=True), dest)
    stats = apply_layer(store.open(diff.digest, verify=True), dest)
    assert stats.whiteouts >= 3
    assert stats.skipped == []
    assert snapshot_tree(dest) == expected
    names = tar_names(store, diff.digest)
    assert {"etc/.wh.remove.me", "var/lib/pkg/.wh..wh..opq", "opt/.wh.old"} <= names
    assert "usr/lib/libnew.so" in names and "var/lib/pkg/a" not in expected


def tar_names(store, digest):
    import io
    import tarfile

    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(store.open(digest)).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return set(tf.getnames())
