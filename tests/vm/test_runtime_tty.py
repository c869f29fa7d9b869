"""`tl sbx exec -it` and `tl sbx shell` on a real pseudo-terminal (pexpect), on both backends
(the microVM: one VM for the module, the terminal a PTY of the guest agent): the program has a terminal of the sandbox's own (`tty`), TERM and the window size
arrive, a resize reaches it (SIGWINCH), Ctrl-C interrupts its foreground program, and the exit
code comes back."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.vm.conftest import module_microvm, sandbox_on_backend

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install pexpect)")

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip

CLI = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"


IMAGE = ('from tlimage import Image\nimage = Image("{name}", base_image="busybox")'
         '.run("echo \'app:x:1234:1234::/tmp:/bin/sh\' >> /etc/passwd")\n')  # fmt: skip


@pytest.fixture(scope="module")
def vm_sandbox(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with module_microvm(tmp_path_factory, "tty-vm", IMAGE) as got:
        yield got


@pytest.fixture(params=["namespace", "microvm"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    with sandbox_on_backend(request, tmp_path, "tty", IMAGE) as sb:
        yield sb


def _tl(*args: str, term: str = "xterm-256color"):  # noqa: ANN202 - a pexpect.spawn
    env = {**os.environ, "TERM": term}
    return pexpect.spawn(sys.executable, ["-c", CLI, *args], env=env, dimensions=(30, 90),
                         timeout=30, encoding="utf-8")  # fmt: skip


def test_exec_it_is_a_real_terminal(sandbox) -> None:  # noqa: ANN001
    c = _tl("sbx", "exec", "-it", sandbox.id, "sh")
    c.expect(r"[#$] ")
    c.sendline("tty; echo T=$TERM; stty size; echo mark-$((40+2))")
    c.expect("mark-42")
    lines = c.before.replace("\r", "").splitlines()
    assert "/dev/pts/0" in lines and "T=xterm-256color" in lines and "30 90" in lines
    c.setwinsize(40, 120)
    c.sendline("stty size; echo mark-$((1+2))")
    c.expect("mark-3")
    assert "40 120" in c.before
    c.sendline("sleep 30; echo sl$((0+1))ept")
    time.sleep(1)
    t0 = time.monotonic()
    c.sendintr()
    c.sendline("echo after-$((2+2))")
    c.expect("after-4")
    assert time.monotonic() - t0 < 10 and "sl1ept" not in c.before
    c.sendline("exit 3")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 3


def test_shell_as_a_user_and_no_terminal_left(sandbox) -> None:  # noqa: ANN001
    c = _tl("sbx", "shell", "--user", "app", sandbox.id, term="vt100")
    c.expect(r"[#$] ")
    c.sendline("id -u; echo $TERM; ls -l $(tty) | cut -c1-30; echo done-$((3*3))")
    c.expect("done-9")
    out = c.before.replace("\r", "")
    assert "\n1234\n" in out and "\nvt100\n" in out
    c.sendline("exit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    left = sandbox.exec("sh", "-c", "ls /dev/pts").stdout.split()
    assert left == [b"ptmx"]


def test_exec_t_without_a_program(sandbox) -> None:  # noqa: ANN001
    c = _tl("sbx", "exec", "-it", sandbox.id, "no-such-program")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 127 and "executable file not found" in c.before
