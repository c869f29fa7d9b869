"""`tl sbx start NAME`: a terminated named sandbox starts again on its kept files, on the
namespace backend (the busybox image, so it is quick), and in the microVM, where terminate lets
the guest sync what was just written before the VM ends."""

from __future__ import annotations

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


def tl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_terminated_named_sandbox_starts_again_with_its_files(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo base > /base.txt\n")
    assert tl("sbx", "image", "create", ".", "-t", "rs:v1", "--isolation", "namespace",
              cwd=tmp_path).returncode == 0  # fmt: skip
    new = tl("sbx", "new", "keep", "--image", "rs:v1", "--isolation", "namespace", cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    assert tl("sbx", "exec", "keep", "sh", "-c", "echo mine > /root/state.txt",
              cwd=tmp_path).returncode == 0  # fmt: skip
    assert tl("sbx", "terminate", "keep", cwd=tmp_path).returncode == 0
    assert tl("sbx", "exec", "keep", "true", cwd=tmp_path).returncode != 0

    started = tl("sbx", "start", "keep", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == new.stdout.strip()  # the same sandbox
    out = tl("sbx", "exec", "keep", "cat", "/root/state.txt", "/base.txt", cwd=tmp_path)
    assert out.stdout == "mine\nbase\n", out.stderr
    again = tl("sbx", "start", "keep", cwd=tmp_path)
    assert again.returncode == 1 and "is Running" in again.stderr
    assert tl("sbx", "rm", "--force", "keep", cwd=tmp_path).returncode == 0

    eph = tl("sbx", "new", "--image", "rs:v1", "--isolation", "namespace", cwd=tmp_path)
    sid = eph.stdout.strip()
    tl("sbx", "terminate", sid, cwd=tmp_path)
    gone = tl("sbx", "start", sid, cwd=tmp_path)
    assert gone.returncode == 1 and "not named" in gone.stderr


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_microvm_terminate_keeps_what_was_just_written(tmp_path: Path) -> None:
    new = tl("sbx", "new", "keepvm", "--image", "busybox", "--isolation", "microvm", cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    # written and terminated at once: the data is in the guest's page cache, not yet on disk
    assert tl("sbx", "exec", "keepvm", "sh", "-c", "head -c 300000 /dev/urandom > /root/r && "
              "md5sum /root/r > /root/sum", cwd=tmp_path).returncode == 0  # fmt: skip
    assert tl("sbx", "terminate", "keepvm", cwd=tmp_path).returncode == 0
    started = tl("sbx", "start", "keepvm", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    check = tl("sbx", "exec", "keepvm", "md5sum", "-c", "/root/sum", cwd=tmp_path)
    assert check.returncode == 0 and "/root/r: OK" in check.stdout, (check.stdout, check.stderr)
    assert tl("sbx", "rm", "--force", "keepvm", cwd=tmp_path).returncode == 0
