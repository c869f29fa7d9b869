"""`tl sbx image create` end to end through the namespace backend (a real overlayfs sandbox
running the busybox base), as CI and people run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
    pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                       reason="busybox-static is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

IMAGE = """\
from tlimage import Image

image = (
    Image("hello", base_image="busybox")
    .run("echo building; mkdir -p /w && echo hi > /w/x")
    .copy("app/", "/srv/app/")
    .env("APP_ENV", "prod")
    .workdir("/srv/app")
    .run("cat greeting.txt && rm /w/x")
    .cmd(["cat", "/srv/app/greeting.txt"])
)
"""


def tl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "greeting.txt").write_text("hello from the image\n")
    (tmp_path / "image.py").write_text(IMAGE)
    return tmp_path


def test_create_json_events_then_ls_describe_rm(project: Path) -> None:
    out = tl("sbx", "image", "create", "image.py", "--isolation", "namespace", "--json",
             "-n", "greeter", cwd=project)  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-3:] == ["snapshot_created", "image_registered", "done"]
    logs = "".join(e["data"] for e in events if e["event"] == "build_log")
    assert "building\n" in logs and "hello from the image\n" in logs
    assert events[-2] == {"event": "image_registered", "project": "default", "name": "greeter",
                          "tag": "latest", "image_id": events[-1]["image_id"]}  # fmt: skip

    again = tl("sbx", "image", "create", "image.py", "--isolation", "namespace", "--json",
               "-n", "greeter", cwd=project)  # fmt: skip
    done = json.loads(again.stdout.splitlines()[-1])
    assert done["executed_steps"] == 0 and done["cached_steps"] == 4
    assert done["image_id"] == events[-1]["image_id"]

    ls = tl("sbx", "image", "ls", cwd=project)
    assert "greeter" in ls.stdout and "latest" in ls.stdout
    desc = json.loads(tl("sbx", "image", "describe", "greeter", cwd=project).stdout)
    assert desc["config"]["cmd"] == ["cat", "/srv/app/greeting.txt"]
    assert "APP_ENV=prod" in desc["config"]["env"]
    assert desc["config"]["workdir"] == "/srv/app"
    assert tl("sbx", "image", "rm", "greeter", cwd=project).returncode == 0
    gone = tl("sbx", "image", "describe", "greeter", cwd=project)
    assert gone.returncode == 1 and "no image greeter:latest" in gone.stderr


def test_failing_run_in_ci_mode_names_the_line(project: Path) -> None:
    (project / "image.py").write_text(IMAGE.replace("cat greeting.txt", "cat missing.txt"))
    out = tl("sbx", "image", "create", "image.py", "--isolation", "namespace", cwd=project)
    assert out.returncode == 1
    assert "error: image.py:9: RUN cat missing.txt && rm /w/x failed with exit code 1" in out.stderr
    assert "| cat: can't open 'missing.txt': No such file or directory" in out.stderr
    assert "Traceback" not in out.stderr
    assert "no images" in tl("sbx", "image", "ls", cwd=project).stderr
