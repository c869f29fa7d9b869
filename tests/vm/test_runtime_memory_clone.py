"""Memory clones: on the microVM (TCG here and in CI) `clone(memory=True)` starts a second VM
from the first one's memory and device state — a counter running in the original keeps
counting in both, from where it was; on the namespace backend the request is refused with a
clear "filesystem only" error. One VM boot."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tlimage.errors import RuntimeError_
from tlimage.runtime import Sandbox

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the image needs root"),
]  # fmt: skip

COUNTER = ("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c.t; mv /tmp/c.t /tmp/c;"
           " sleep 0.2; done' >/dev/null 2>&1 &")  # fmt: skip


@pytest.fixture
def image(tmp_path: Path) -> str:
    from tlimage.builder import build_image

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("memclone", base_image="busybox").run("true")\n'
    )
    build_image(tmp_path / "image.py", isolation="namespace")
    return "memclone"


def _count(sb: Sandbox) -> int:
    return int(sb.exec("cat", "/tmp/c").stdout)


def _start_counter(sb: Sandbox) -> None:
    """Starts COUNTER in the background and waits until it has counted to 3."""
    sb.exec("sh", "-c", COUNTER)
    deadline = time.monotonic() + 60
    while sb.exec("sh", "-c", "test -s /tmp/c").exit_code != 0 or _count(sb) < 3:
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.2)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_microvm_memory_clone_keeps_processes_running_in_both(image: str) -> None:
    sb = Sandbox.create(image, name="orig", backend="microvm", timeout=900)
    twin = None
    try:
        _start_counter(sb)
        with pytest.raises(RuntimeError_, match="registers no image"):
            sb.clone(memory=True, register="x:y")
        t0 = time.monotonic()
        twin = sb.clone("twin", memory=True)
        took = time.monotonic() - t0
        print(f"memory clone took {took:.2f} s")
        a0, b0 = _count(sb), _count(twin)
        assert b0 >= 3  # the clone's counter did not start over: it is the same process
        time.sleep(3)
        a1, b1 = _count(sb), _count(twin)
        assert a1 > a0 and b1 > b0, (a0, a1, b0, b1)
        info = twin.info()
        assert info.source == sb.id and info.status == "Running" and info.backend == "microvm"
        # Their filesystems are separate from here on.
        sb.exec("sh", "-c", "echo orig > /tmp/only")
        assert twin.exec("cat", "/tmp/only").exit_code != 0
        rec = twin.record
    finally:
        if twin is not None:
            twin.terminate()
        sb.terminate()
    for name in ("ram", "vmstate", "disks"):
        assert not (Path(rec.dir) / name).exists(), name


@pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                    reason="util-linux (nsenter, unshare) is not installed")  # fmt: skip
def test_namespace_memory_clone_is_refused_clearly(image: str) -> None:
    with Sandbox.create(image, backend="namespace") as sb:
        with pytest.raises(RuntimeError_, match="filesystem only"):
            sb.clone(memory=True)
        assert sb.status == "Running"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_microvm_memory_checkpoint_and_restore(image: str) -> None:
    from tlimage.runtime import list_checkpoints, remove_checkpoint

    sb = Sandbox.create(image, name="ckpt", backend="microvm", timeout=900)
    restored = None
    try:
        _start_counter(sb)
        name = sb.save_memory("ckpt-1")
        at = _count(sb)
        assert name == "ckpt-1" and list_checkpoints() == ["ckpt-1"]
        sb.terminate()  # the checkpoint does not need its sandbox
        restored = Sandbox.from_checkpoint("ckpt-1", name="back")
        first = _count(restored)
        assert 3 <= first <= at + 10  # it continues from the checkpoint, not from zero
        time.sleep(2)
        assert _count(restored) > first
        assert restored.info().source == "checkpoint ckpt-1"
        with pytest.raises(RuntimeError_, match="no checkpoint 'nope'"):
            Sandbox.from_checkpoint("nope")
    finally:
        if restored is not None:
            restored.terminate()
        sb.terminate()
    remove_checkpoint("ckpt-1")
    assert list_checkpoints() == []
