"""The on-disk layout (`tlimage/_layout.py`): every versioned folder is named there, and prune
trims the executor's buckets by size, oldest first, never what is in use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tlimage
from tlimage import _layout
from tlimage.builder.gc import evict

PACKAGE = Path(tlimage.__file__).parent


def test_versioned_folder_names_are_spelled_only_in_the_layout() -> None:
    names = {b.path.split("/")[0] for b in _layout.BUCKETS} | {
        b.path.rsplit("/", 1)[-1] for b in _layout.BUCKETS
    }
    versioned = sorted(n for n in names if re.search(r"-v\d+(\.db)?$", n))
    assert "layers-v1" in versioned and "runtime-v1.db" in versioned
    alternatives = "|".join(map(re.escape, versioned))
    pattern = re.compile(r"""["'](""" + alternatives + r""")["']""")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "_layout.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "use tlimage._layout instead:\n" + "\n".join(found)


def _entry(root: Path, bucket: _layout.Bucket, name: str, size: int, age: float) -> Path:
    folder = bucket.under(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if bucket is _layout.EXT4:
        path.write_bytes(os.urandom(size))
    else:
        path.mkdir()
        (path / "data").write_bytes(os.urandom(size))
    t = 1_700_000_000 + age
    os.utime(path, (t, t))
    return path


def test_evict_takes_the_oldest_first_down_to_the_budget(tmp_path: Path) -> None:
    old = _entry(tmp_path, _layout.EXT4, "a.img", 64 << 10, 1)
    mid = _entry(tmp_path, _layout.BASES, "busybox-1", 64 << 10, 2)
    url = _entry(tmp_path, _layout.DOWNLOADS, "5e" * 32, 64 << 10, 2.5)  # an ADD <url> body
    new = _entry(tmp_path, _layout.GUEST, "6.1-k", 64 << 10, 3)
    making = _entry(tmp_path, _layout.EXT4, ".b.123.tmp", 64 << 10, 0)
    got = evict(tmp_path, 100 << 10)
    assert not old.exists() and not mid.exists() and not url.exists()
    assert new.exists() and making.exists()
    assert got.entries == 3 and got.freed_bytes >= 192 << 10
    assert got.remaining_bytes <= 100 << 10


def test_evict_keeps_what_is_open_or_named_by_a_live_sandbox(tmp_path: Path) -> None:
    held = _entry(tmp_path, _layout.EXT4, "held.img", 16 << 10, 1)
    kit = _entry(tmp_path, _layout.GUEST, "6.1-old", 16 << 10, 2)
    free = _entry(tmp_path, _layout.BASES, "debian-1", 16 << 10, 3)
    reader = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); "
                               "sys.stdin.read()", str(held)], stdin=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(100):  # until the child has the file open
            if any(os.path.realpath(f"/proc/{reader.pid}/fd/{fd}") == str(held)
                   for fd in os.listdir(f"/proc/{reader.pid}/fd")):  # fmt: skip
                break
            time.sleep(0.05)
        got = evict(tmp_path, 0, keep_paths=[kit / "data"])
    finally:
        reader.communicate(b"")
    assert held.exists() and kit.exists() and not free.exists()
    assert got.entries == 1


@pytest.mark.parametrize("bucket", _layout.BUCKETS, ids=lambda b: b.name)
def test_buckets_are_below_their_root(bucket: _layout.Bucket, tmp_path: Path) -> None:
    assert bucket.under(tmp_path).is_relative_to(tmp_path)
    assert not Path(bucket.path).is_absolute() and ".." not in bucket.path.split("/")


def test_cache_ls_folders_lists_every_bucket(tmp_path: Path) -> None:
    import json

    _entry(tmp_path / "c", _layout.EXT4, "x.img", 8 << 10, 1)
    env = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "c"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "s")}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", "cache", "ls",
                          "--folders", "--json"], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rows = {r["bucket"]: r for r in map(json.loads, out.splitlines())}
    assert list(rows) == [b.name for b in _layout.BUCKETS]
    assert rows["ext4"]["entries"] == 1 and rows["ext4"]["size"] >= 8 << 10
    assert rows["ext4"]["path"] == str(tmp_path / "c" / "executor-v1" / "ext4")
