"""Through the CLI with the namespace backend: a RUN that fills a 64 MiB cache disk ends in one
clear error (step and full folder named; an `error` event with --json), nothing half-stored and a
cache that builds afterwards; SIGTERM stops a build as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_disk_full import check_nothing_half_stored

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the backends need root"),
]

IMAGE = """\
from tlimage import Image

image = (
    Image("fill", base_image="busybox")
    .run("echo small > /small")
    .run("{cmd}")
)
"""


def create(tmp_path: Path, env: dict[str, str], **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(
        [sys.executable, "-m", "tlimage", "sbx", "image", "create", "image.py", "--json",
         "--isolation", "namespace"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def test_run_filling_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    env = {**os.environ, "TLIMAGE_CACHE_DIR": str(mnt / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    try:
        (tmp_path / "image.py").write_text(IMAGE.format(
            cmd="head -c 41943040 /dev/urandom > /big"))  # fmt: skip
        p = create(tmp_path, env)
        out, err = p.communicate(timeout=600)
        assert p.returncode == 1, err
        assert "Traceback" not in err
        last = json.loads(out.splitlines()[-1])
        assert last["event"] == "error", last
        assert str(mnt) in last["message"] and "image.py:6" in (
            last["message"] + str(last.get("at") or "")
        ), last
        monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(mnt / "cache"))
        check_nothing_half_stored(mnt)
        (tmp_path / "image.py").write_text(IMAGE.format(cmd="echo fine > /fine"))
        p = create(tmp_path, env)
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        done = json.loads(out.splitlines()[-1])
        assert done["event"] == "done" and done["cached_steps"] >= 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sigterm_stops_a_build_like_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "TLIMAGE_CACHE_DIR": str(tmp_path / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    (tmp_path / "image.py").write_text(IMAGE.format(cmd="echo started; sleep 300"))
    p = create(tmp_path, env)
    assert p.stdout is not None
    deadline = time.monotonic() + 300
    lines = []
    for line in p.stdout:
        lines.append(line)
        if '"started' in line or time.monotonic() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    try:
        rest, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the build did not stop within 60 s of SIGTERM")
    assert p.returncode == 130, err
    assert "Traceback" not in err
    last = json.loads((lines + rest.splitlines())[-1])
    assert last["event"] == "error" and "interrupted" in last["message"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 300" not in ps
    assert not list((tmp_path / "cache").rglob("tlimage-step-*"))
