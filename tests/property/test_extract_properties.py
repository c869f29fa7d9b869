"""Property: random archives and trees with hostile entries (`..`, absolute names, link chains,
hard links out, devices, long names) never touch a bait tree outside the destination, whichever
host-side path extracts or copies them (layers, overlay lowers, ADD, COPY --from, `cp`, a
microVM's export). Thousands of cases per run, bounded by `max_examples` and no deadline."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_hostfs import make_bait, snapshot
from tlimage.errors import TlimageError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extracting owners needs root")

BASE = Path(tempfile.mkdtemp(prefix="tl-prop-extract-"))
BAIT = make_bait(BASE / "bait")
BAIT_SNAPSHOT = snapshot(BAIT)
BAIT_INODES = {(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in BAIT.rglob("*")}
MARK = b"do not touch"

_comp = st.sampled_from(["a", "b", "c", "..", ".", "", "bait.txt", "sub", "inner", "link",
                         ".wh.a", ".wh..wh..opq", "x" * 300, "é"])  # fmt: skip
_rel = st.lists(_comp, min_size=1, max_size=5).map("/".join)
_hostile = st.sampled_from([str(BAIT), str(BAIT / "bait.txt"), str(BAIT / "sub"), "/",
                            "../" * 8 + str(BAIT).lstrip("/"), "..", "../..", "/proc/self/root",
                            str(BAIT / "link")])  # fmt: skip
_name = st.one_of(_rel, _hostile, _rel.map(lambda r: "/" + r))
_target = st.one_of(_rel, _hostile, st.builds(lambda a, b: a + "/" + b, _hostile, _rel))
_kind = st.sampled_from(["file", "dir", "sym", "hard", "chr", "blk", "fifo"])
_entry = st.tuples(_kind, _name, _target, st.integers(0, 0o7777), st.binary(max_size=16))
_archive = st.lists(_entry, min_size=1, max_size=10)

TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
         "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
         "fifo": tarfile.FIFOTYPE}  # fmt: skip


def build_tar(entries, prefix: str = "") -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        if prefix:
            d = tarfile.TarInfo(prefix)
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for kind, name, target, mode, data in entries:
            ti = tarfile.TarInfo(prefix + "/" + name.lstrip("/") if prefix else name)
            ti.type = TYPES[kind]
            ti.mode, ti.uid, ti.gid = mode, 4242, 4242
            ti.linkname = prefix + "/" + target if prefix and kind == "hard" else target
            ti.devmajor, ti.devminor = 1, 3
            ti.size = len(data) if kind == "file" else 0
            tf.addfile(ti, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def check_bait(dest: Path) -> None:
    assert snapshot(BAIT) == BAIT_SNAPSHOT, "the bait tree changed"
    if os.path.islink(dest):  # a link made as a link (cp of a symlink) is walked no further
        return
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            assert (s.st_dev, s.st_ino) not in BAIT_INODES, f"{p} links to a bait file"
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    assert MARK not in f.read(), f"{p} holds a bait file's bytes"


def fresh() -> Path:
    return Path(tempfile.mkdtemp(prefix="c", dir=BASE)) / "deep" / "dest"


def extract(mode: str, data: bytes, dest: Path) -> None:
    from tlimage import _fs

    if mode == "apply":
        from tlimage.cache.layer import apply_layer

        apply_layer(io.BytesIO(data), dest, compressed=False)
    elif mode == "overlay":
        dest.mkdir(parents=True)
        _fs.extract_tar(io.BytesIO(data), dest, mode="r|", whiteouts="overlay")
    elif mode == "add":
        _fs.extract_tar(io.BytesIO(data), dest, under="usr/t")
    elif mode == "cp":
        from tlimage.runtime.namespace import read_tar

        dest.parent.mkdir(parents=True)
        read_tar(io.BytesIO(data), dest)
    else:
        from tlimage.executor.microvm import unpack_export

        dest.mkdir(parents=True)
        unpack_export(io.BytesIO(data), dest)  # type: ignore[arg-type]


@settings(max_examples=1500, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(_archive, st.sampled_from(["apply", "overlay", "add", "cp", "export"]))
def test_hostile_archives_stay_inside(entries, mode: str) -> None:  # noqa: ANN001
    dest = fresh()
    data = build_tar(entries, prefix="_" if mode == "cp" else "")
    try:
        extract(mode, data, dest)
    except TlimageError:
        pass
    check_bait(dest)
    shutil.rmtree(dest.parent.parent)


_pattern = st.lists(st.sampled_from(["*", "a", "b", "sub", "..", "link", "?", "[ab]", "c*"]),
                    min_size=1, max_size=4).map("/".join)  # fmt: skip


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(_archive, st.lists(_pattern, min_size=1, max_size=3), st.text("/ab", max_size=6))
def test_copy_from_a_hostile_tree_stays_inside(entries, patterns, dest_path) -> None:  # noqa: ANN001
    """A stage's root built from a hostile archive, then COPY --from with wildcards into a
    fresh upper: nothing is read from or written to the host outside the two trees."""
    from tlimage import _fs
    from tlimage.builder import context as ctx

    stage = fresh()
    try:
        _fs.extract_tar(io.BytesIO(build_tar(entries)), stage)
    except TlimageError:
        pass
    upper = stage.parent / "upper"
    upper.mkdir()
    try:
        sources = ctx.select_sources(stage, patterns)
        ctx.lay_out(upper, sources, "/" + dest_path, dest_is_dir_in_image=False)
    except TlimageError:
        pass
    check_bait(stage.parent)
    shutil.rmtree(stage.parent.parent)
