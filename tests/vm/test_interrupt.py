"""An interrupted build (Ctrl-C, a step time-out) leaves no registered image, no stray VM or
sandbox process, and a cache the next build can use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the backends need root"),
]

IMAGE = """\
from tlimage import Image

image = (
    Image("slow", base_image="busybox")
    .run("echo quick > /quick")
    .run("echo started; sleep 300")
)
"""


def leftover_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def _at_a_terminal() -> None:
    """As a command typed at a terminal starts: SIGINT at its default action. (Under a test
    run started in the background, e.g. with nohup, it is inherited ignored, and a program
    rightly keeps it so: the Ctrl-C would never arrive.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("isolation", ["namespace", "microvm"])
def test_ctrl_c_during_a_step(tmp_path: Path, isolation: str) -> None:
    if isolation == "microvm" and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed")
    (tmp_path / "image.py").write_text(IMAGE)
    env = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlimage", "sbx", "image", "create", "image.py", "--json",
         "--isolation", isolation],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_at_a_terminal,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if '"started' in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the build did not stop within 60 s of Ctrl-C")
    assert proc.returncode == 130
    assert leftover_processes("sleep 300") == []
    assert leftover_processes(str(tmp_path)) == []
    ls = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", "ls", "--json"],
                        cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert ls.stdout.strip() == ""
    # The next build reuses what finished before the interrupt.
    (tmp_path / "image.py").write_text(IMAGE.replace("sleep 300", "true"))
    done = subprocess.run(
        [sys.executable, "-m", "tlimage", "sbx", "image", "create", "image.py", "--json",
         "--isolation", isolation],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["event"] == "done" and last["cached_steps"] == 1 and last["executed_steps"] == 1


def test_step_timeout_fails_the_build(tmp_path: Path) -> None:
    (tmp_path / "image.py").write_text(IMAGE)
    env = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "tlimage", "sbx", "image", "create", "image.py",
         "--isolation", "namespace", "--step-timeout", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "error: image.py:6: step timed out after 2 s" in out.stderr
    assert leftover_processes("sleep 300") == []
