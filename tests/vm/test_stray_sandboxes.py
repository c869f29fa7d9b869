"""`tl sbx doctor` finds sandboxes that run with no record — their state folder was removed
while they ran (a benchmark that failed half-way), so nothing could reach them — and `--fix`
ends them and removes their cgroups. Only the state folder's own sandboxes: another state
folder's, lost the same way, are neither reported nor touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.conftest import state_in
from tlimage.runtime import Sandbox
from tlimage.sandbox.proc import alive

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root here"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux is not installed"),
]

IMAGE = """\
from tlimage import Image

image = Image("stray", base_image="busybox").run("echo kept > /kept")
"""


def _lost_sandbox(base: Path, backend: str = "namespace") -> Sandbox:
    """A running sandbox of the state folder `base/state`, built and started there."""
    from tlimage.builder import build_image

    base.mkdir()
    (base / "image.py").write_text(IMAGE)
    with state_in(base):
        build_image(base / "image.py", isolation="namespace")
        sb = Sandbox.create("stray", backend=backend, timeout=600)
    assert sb.exec("cat", "/kept").stdout == b"kept\n"
    return sb


def doctor(base: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "TLIMAGE_STATE_DIR": str(base / "state"),
           "TLIMAGE_CACHE_DIR": str(base / "cache"), "TLIMAGE_KVM": "0"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "doctor", "--json", *args],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    plain = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "doctor"],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    return checks["stray sandboxes"], plain.stdout


def _cgroups(sb: Sandbox) -> list[str]:
    return list(((sb.record.extra.get("cgroup") or {}).get("dirs") or {}).values())


def test_doctor_ends_the_sandboxes_of_a_removed_state_folder(tmp_path: Path) -> None:
    mine, theirs = _lost_sandbox(tmp_path / "a"), _lost_sandbox(tmp_path / "b")
    try:
        for base in (tmp_path / "a", tmp_path / "b"):
            check, _ = doctor(base)
            assert check["status"] == "ok" and check["sandboxes"] == []  # each has its record

        shutil.rmtree(tmp_path / "a" / "state")  # records, folders, everything of a's
        assert alive(mine.record.pids["init"])  # ... and its sandbox runs on, unreachable
        check, text = doctor(tmp_path / "a")
        assert check["status"] == "warn", check
        assert [s["sandbox_id"] for s in check["sandboxes"]] == [mine.id]  # not b's
        found = check["sandboxes"][0]
        assert found["backend"] == "namespace" and found["folder_exists"] is False
        assert found["pid"] == mine.record.pids["init"][0]
        assert sorted(found["cgroups"]) == sorted(_cgroups(mine))
        assert mine.id in text and "tl sbx doctor --fix" in text

        check, _ = doctor(tmp_path / "b")  # b's sandbox has its record: not stray
        assert check["sandboxes"] == []

        check, _ = doctor(tmp_path / "a", "--fix")
        assert check["status"] == "ok" and check["sandboxes"][0]["ended"] is True, check
        assert not alive(mine.record.pids["init"])
        assert not [d for d in _cgroups(mine) if os.path.exists(d)]
        assert alive(theirs.record.pids["init"])  # another state folder's: untouched
        assert all(os.path.exists(d) for d in _cgroups(theirs))
        check, _ = doctor(tmp_path / "a")
        assert check["status"] == "ok" and check["sandboxes"] == []

        # b's sandbox lost its folder too: a's doctor still leaves it alone, b's ends it.
        shutil.rmtree(tmp_path / "b" / "state")
        check, _ = doctor(tmp_path / "a", "--fix")
        assert check["sandboxes"] == [] and alive(theirs.record.pids["init"])
        check, _ = doctor(tmp_path / "b", "--fix")
        assert [s["sandbox_id"] for s in check["sandboxes"]] == [theirs.id]
        assert not alive(theirs.record.pids["init"])
        assert not [d for d in _cgroups(theirs) if os.path.exists(d)]
    finally:
        from tlimage.sandbox import stray

        for sb in (mine, theirs):  # whatever a failure left running
            for s in stray.find(Path(sb.record.dir).parent):
                if s.sandbox_id == sb.id:
                    stray.end(s)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_doctor_ends_a_microvm_whose_state_folder_was_removed(tmp_path: Path) -> None:
    sb = _lost_sandbox(tmp_path / "vm", backend="microvm")
    shim, qemu = sb.record.pids["shim"], sb.record.pids["qemu"]
    try:
        shutil.rmtree(tmp_path / "vm" / "state")
        check, _ = doctor(tmp_path / "vm")
        assert [(s["sandbox_id"], s["backend"], s["pid"]) for s in check["sandboxes"]] == [
            (sb.id, "microvm", shim[0])
        ], check
        check, _ = doctor(tmp_path / "vm", "--fix")
        assert check["sandboxes"][0]["ended"] is True, check
        assert not alive(shim) and not alive(qemu)  # the shim ended its VM
        assert not Path(sb.record.run_dir).exists()  # and removed its sockets' folder
    finally:
        from tlimage.sandbox import stray

        for s in stray.find(Path(sb.record.dir).parent):
            stray.end(s)
