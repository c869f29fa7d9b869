"""A full disk during a build: one clear error naming the step and the folder that is full, an
`error` event, nothing half-stored, and a cache that works afterwards. The cache sits on a 64 MiB
tmpfs (root only). Also: what crashed builds leave (microVM scratch, lock notes) is swept once
its owner is gone, and `tl sbx cp` of a missing host path is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage.builder import build, build_image
from tlimage.errors import DiskFullError, TlimageError
from tlimage.executor.fake import FakeExecutor, default_handler

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(mnt / "cache"))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_writer(req, upper: Path, emit) -> int:  # noqa: ANN001 - the fake executor's handler
    if "big" in " ".join(req.argv):
        with open(upper / "big", "wb") as f:
            for _ in range(40):
                f.write(os.urandom(1 << 20))
        return 0
    return default_handler(req, upper, emit)


def check_nothing_half_stored(mnt: Path) -> None:
    store = next((mnt / "cache").glob("layers-v*"))
    leftovers = [p for p in store.rglob(".tmp-*")]
    assert leftovers == [], leftovers
    tmp = store / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == []
    from tlimage.cache.cache import LayerCache

    with LayerCache(None) as cache:
        for e in cache.ls():
            assert cache.store.verify(e.digest), e


@pytest.mark.parametrize("case", ["copy", "run"])
def test_a_full_disk_is_one_clear_error_and_the_cache_survives(
    tmp_path: Path, small_cache: Path, case: str
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "small.txt").write_text("small\n")
    if case == "copy":
        (ctx / "big.bin").write_bytes(os.urandom(50 << 20))
        step = "COPY big.bin /big.bin"
    else:
        step = "RUN big"
    (ctx / "Dockerfile").write_text(f"FROM scratch\nCOPY small.txt /s\n{step}\n")
    ex = FakeExecutor(handler=big_writer)
    with pytest.raises(DiskFullError) as info:
        build_image(ctx / "Dockerfile", executor=ex, register=False)
    text = info.value.render()
    assert "Dockerfile:3" in text and str(small_cache) in text and "is full" in text, text
    assert "Traceback" not in text
    check_nothing_half_stored(small_cache)
    # The same failure through the events API ends in an `error` event.
    events = list(build(ctx / "Dockerfile", executor=FakeExecutor(handler=big_writer),
                        register=False))  # fmt: skip
    assert events[-1]["event"] == "error" and str(small_cache) in events[-1]["message"]
    # The cache works afterwards: the step before is cached, a small step builds.
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY small.txt /s\nCOPY small.txt /t\n")
    (ctx / "big.bin").unlink(missing_ok=True)
    evs: list[dict] = []
    build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False, emit=evs.append)
    assert [
        e["event"]
        for e in evs
        if e.get("index") in (1, 2) and e["event"] in ("step_cached", "step_done")
    ] == ["step_cached", "step_done"]
    check_nothing_half_stored(small_cache)


def test_stale_vm_scratch_and_lock_notes_are_swept(tmp_path: Path) -> None:
    from tlimage.builder.gc import sweep_lock_notes, sweep_vm_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"tl-vm-{dead.pid}-abc").mkdir()
    (tmp_path / f"tl-vm-{os.getpid()}-abc").mkdir()  # ours: alive
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path / "tl-vm-old")]
    )
    try:
        (tmp_path / "tl-vm-old").mkdir()  # no pid in the name, but a process names it
        while b"tl-vm-old" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
            time.sleep(0.01)
        assert sweep_vm_scratch(str(tmp_path)) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"tl-vm-{os.getpid()}-abc",
                                                              "tl-vm-old"]  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert sweep_vm_scratch(str(tmp_path)) == 0  # unnamed and new: left alone a while
    os.utime(tmp_path / "tl-vm-old", (time.time() - 3600,) * 2)
    assert sweep_vm_scratch(str(tmp_path)) == 1  # old, and nobody names it any more

    notes = tmp_path / "cache" / "lock.holders"
    notes.mkdir(parents=True)
    (notes / f"{dead.pid}-aa.json").write_text("{}")
    (notes / f"{dead.pid}-bb.tmp").write_text("")
    (notes / f"{os.getpid()}-cc.json").write_text("{}")
    assert sweep_lock_notes(tmp_path / "cache") == 2
    assert [p.name for p in notes.iterdir()] == [f"{os.getpid()}-cc.json"]


def test_prune_alias_and_cp_of_a_missing_source(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", "cache", "prune"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "removed" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "cp", "./in", "nosuch:/tmp/"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "./in" in out.stderr or "in:" in out.stderr, out.stderr


def test_cp_in_of_a_missing_host_path_names_it(tmp_path: Path) -> None:
    from tlimage.runtime._api import Sandbox

    with pytest.raises(TlimageError, match="no such file or folder on the host"):
        Sandbox.cp_in(object.__new__(Sandbox), tmp_path / "in", "/tmp/")  # type: ignore[arg-type]
