"""Background processes on both backends (the microVM: one VM for the module, each process a
session of the guest agent): spawn, status, signals, wait, output rings (bounded, followed
live), the CLI, and a process that outlives the command that started it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm.conftest import module_microvm, sandbox_on_backend
from tlimage.runtime import ExecStartError
from tlimage.runtime._procs import RING_CAP

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip

TICKER = "i=0; while true; do echo tick $i; echo err $i >&2; i=$((i+1)); sleep 0.1; done"


SECRETS = {"TOKEN": "from-the-store"}
IMAGE = 'from tlimage import Image\nimage = Image("{name}", base_image="busybox").run("true")\n'


@pytest.fixture(scope="module")
def vm_sandbox(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with module_microvm(tmp_path_factory, "procs-vm", IMAGE, secrets=SECRETS) as got:
        yield got


@pytest.fixture(params=["namespace", "microvm"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    with sandbox_on_backend(request, tmp_path, "procs", IMAGE, secrets=SECRETS) as sb:
        yield sb


def test_spawn_signal_wait_and_streams(sandbox) -> None:  # noqa: ANN001
    p = sandbox.spawn("sh", "-c", TICKER, name="ticker")
    st = p.status()
    assert st.state == "running" and st.name == "ticker" and isinstance(p.pid, int)
    out = b""
    for chunk in p.stdout:
        out += chunk
        if out.count(b"\n") >= 3:
            break
    assert out.startswith(b"tick 0\ntick 1\ntick 2\n")
    seen = sandbox.exec("sh", "-c", f"cat /proc/{p.pid}/cmdline | tr '\\0' ' '").stdout
    assert seen.startswith(b"sh -c i=0")  # the pid is the one inside the sandbox
    p.signal("INT")
    assert p.wait(10) == 130
    st = p.status()
    assert (st.state, st.exit_code) == ("exited", 130) and st.ended_at is not None
    assert p.output("stderr").startswith(b"err 0\n")
    with pytest.raises(Exception, match="is exited"):
        p.signal("TERM")

    q = sandbox.spawn("sh", "-c", 'echo "$TOKEN $X"; exit 7', env={"X": "y"}, workdir="/tmp")
    assert q.wait(10) == 7 and b"".join(q.stdout) == b"from-the-store y\n"
    with pytest.raises(ExecStartError, match="not found"):
        sandbox.spawn("no-such-program")
    assert [x.status().state for x in sandbox.processes()] == ["exited", "exited", "failed"]
    assert sandbox.process("ticker").id == p.id


def test_output_ring_is_bounded(sandbox) -> None:  # noqa: ANN001
    # ~3 MiB of numbered lines: the ring keeps at most RING_CAP bytes, the newest ones.
    p = sandbox.spawn("sh", "-c", "seq 1 400000; echo done")
    assert p.wait(60) == 0
    ring = p.dir / "stdout.ring"
    assert ring.stat().st_size <= RING_CAP + 16
    kept = p.output()
    assert kept.endswith(b"399999\n400000\ndone\n") and len(kept) >= RING_CAP // 2
    assert not kept.startswith(b"1\n")


def test_cli_and_a_process_outliving_its_command(sandbox) -> None:  # noqa: ANN001
    def tl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    sid = sandbox.id
    r = tl("sbx", "spawn", "--name", "web", sid, "--", "sh", "-c", TICKER)
    assert r.returncode == 0, r.stderr
    pid = r.stdout.strip()
    assert pid.isdigit()
    time.sleep(0.5)  # the spawning command has exited; the process runs on
    # `cmd &` outlives the exec that started it on both backends (no setsid needed)
    assert sandbox.exec("sh", "-c", "sleep 1000 >/dev/null 2>&1 &").exit_code == 0
    time.sleep(0.5)
    assert sandbox.exec("sh", "-c", "ps | grep -c 'sleep 100[0]'").stdout == b"1\n"
    ps = [json.loads(line) for line in tl("sbx", "ps", "--json", sid).stdout.splitlines()]
    ps = [x for x in ps if x["state"] == "running"]  # (the microVM's ran the other tests too)
    assert [(x["id"], x["name"], x["state"]) for x in ps] == [(int(pid), "web", "running")]
    assert "web" in tl("sbx", "ps", sid).stdout
    logs = tl("sbx", "logs", sid, pid, "--stream", "stdout")
    assert logs.stdout.startswith("tick 0\n") and logs.stderr == ""
    follow = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))",
         "sbx", "logs", "-f", sid, "web", "--stream", "stderr"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(0.5)
    assert tl("sbx", "kill", sid, pid, "-s", "KILL").returncode == 0
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0 and out == "" and err.startswith("err 0\nerr 1\n")
    w = tl("sbx", "wait", sid, pid)
    assert (w.returncode, w.stdout) == (137, "137\n")
    bad = tl("sbx", "kill", sid, "99")
    assert bad.returncode == 1 and "no process 99" in bad.stderr
    bad = tl("sbx", "kill", sid, pid, "-s", "NOPE")
    assert bad.returncode == 1 and "unknown signal" in bad.stderr
