"""The `tl` command as a user runs it: a real subprocess, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import FIXTURES, ROOT


def tl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlimage", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_the_image_commands() -> None:
    out = tl("sbx", "image", "--help")
    assert out.returncode == 0
    assert "compile" in out.stdout


def test_compile_prints_ir_and_json() -> None:
    text = tl("sbx", "image", "compile", "examples/data_tools/image.py")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith('tlimage-ir 2\nimage name="data-tools"')
    js = tl("sbx", "image", "compile", "examples/data_tools/image.py", "--emit", "json")
    doc = json.loads(js.stdout)
    assert doc["name"] == "data-tools"
    assert [s["op"] for s in doc["stages"][0]["steps"]] == ["from", "run", "run", "env"]
    assert doc["digest"] == doc["stages"][0]["steps"][-1]["digest"]


def test_several_images_need_a_choice() -> None:
    folder = FIXTURES / "dsl" / "shared-base"
    out = tl("sbx", "image", "compile", "image.py", cwd=folder)
    assert out.returncode == 2
    assert "defines several images (api, worker)" in out.stderr
    assert "--image-name NAME" in out.stderr
    assert "Traceback" not in out.stderr
    picked = tl("sbx", "image", "compile", "image.py", "--image-name", "worker", cwd=folder)
    assert picked.returncode == 0 and 'name="worker"' in picked.stdout
    assert "deprecated" not in picked.stderr
    unknown = tl("sbx", "image", "compile", "image.py", "--image-name", "nope", cwd=folder)
    assert "no image named 'nope'; available: api, worker" in unknown.stderr
    # -i means interactive in tl (as in docker); the old `-i NAME` still works, with a notice.
    old = tl("sbx", "image", "compile", "image.py", "-i", "worker", cwd=folder)
    assert old.returncode == 0 and 'name="worker"' in old.stdout
    assert "`tl sbx image compile -i NAME` is deprecated" in old.stderr
    assert "use --image-name NAME" in old.stderr
    both = tl("sbx", "image", "compile", "image.py", "-i", "worker", "--image-name", "api",
              cwd=folder)  # fmt: skip
    assert both.returncode == 2 and "disagree" in both.stderr
    helptext = tl("sbx", "image", "compile", "--help", cwd=folder).stdout
    assert "--image-name" in helptext and " -i" not in helptext


def test_user_mistakes_get_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "image.py").write_text("from tlimage import Image\nimg = Image('x').env('', 1)\n")
    out = tl("sbx", "image", "compile", "image.py", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: image.py:2: env(): invalid environment variable name")
    assert "Traceback" not in out.stderr


def test_unknown_file_kind(tmp_path: Path) -> None:
    (tmp_path / "image.txt").write_text("")
    out = tl("sbx", "image", "compile", "image.txt", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot tell what kind of image file this is" in out.stderr
