"""The cache root, the state root and the run root are 0700: a host user other than their owner
cannot list or read the image trees, sandbox files and build scratch below them (issue #11)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage import _private
from tlimage._private import private_dir

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, check=False)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every host user can walk into (pytest's own are 0700, which would hide what is
    tested here)."""
    d = Path(tempfile.mkdtemp(prefix="tl-private-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    _private._checked.clear()


def test_made_0700_with_parents(open_dir: Path) -> None:
    p = private_dir(open_dir / "a" / "b")
    assert mode(p) == 0o700
    assert mode(open_dir / "a") & 0o055  # missing parents are not the root: left at the default


def test_wider_folder_of_ours_is_tightened(open_dir: Path) -> None:
    p = open_dir / "cache"
    p.mkdir()
    os.chmod(p, 0o777)
    private_dir(p)
    assert mode(p) == 0o700


def test_wider_folder_of_someone_else_is_named_in_a_notice(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    monkeypatch.setenv("TLIMAGE_NOTICES", "always")
    p = open_dir / "theirs"
    p.mkdir()
    os.chmod(p, 0o755)
    os.chown(p, 65534, 65534)
    private_dir(p)
    assert mode(p) == 0o755  # not ours to change
    err = capsys.readouterr().err
    assert str(p) in err and "chmod 700" in err


def test_cache_root_and_state_root_are_0700(open_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tlimage.cache.store import BlobStore
    from tlimage.runtime._state import StateDB

    cache, state = open_dir / "cache", open_dir / "state"
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(cache))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(state))
    store = BlobStore()
    store.put_bytes(b"a secret baked into an image")
    StateDB().get("nothing")
    assert mode(cache) == 0o700
    assert mode(state) == 0o700


def test_existing_wide_cache_root_is_tightened(open_dir: Path) -> None:
    from tlimage.cache.store import BlobStore

    cache = open_dir / "cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)
    BlobStore(cache)
    assert mode(cache) == 0o700


def test_another_host_user_cannot_list_or_read_the_cache(open_dir: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to act as another user")
    from tlimage.cache.store import BlobStore

    cache = open_dir / "cache"
    ref = BlobStore(cache).put_bytes(b"a secret baked into an image")
    blob = BlobStore(cache).blob_path(ref.digest)
    os.chmod(blob, 0o644)  # even a world-readable file below it stays out of reach
    assert as_nobody("ls", str(open_dir)).returncode == 0  # the user can reach the parent
    assert as_nobody("ls", str(cache)).returncode != 0
    r = as_nobody("cat", str(blob))
    assert r.returncode != 0 and "secret" not in r.stdout
