"""MicroVM sandboxes end to end (TCG here and in CI; KVM where it boots): an image built by the
executor is booted in QEMU, exec'd into, copied to and from, suspended to a file and resumed
with its processes intact, snapshotted, cloned and terminated, and then no QEMU, shim, socket
or ephemeral file may be left. Three VM boots in all; CI has two cores."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.vm.netcheck import check_probe, host_servers, probe_script
from tlimage.runtime import ExecStartError, ExecTimeout, Sandbox, Status, reconcile

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the image needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

IMAGE = """\
from tlimage import Image

image = (
    Image("vmrt", base_image="busybox")
    .run("mkdir -p /srv/app && echo 'from the image' > /srv/app/greeting.txt")
    .env("APP_ENV", "prod")
    .workdir("/srv/app")
)
"""


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmd and state != "Z":
            found.append(f"{pid}: {cmd[:100]!r}")
    return found


def leftovers(rec) -> list[str]:  # noqa: ANN001 - a SandboxRecord
    from tlimage.sandbox.proc import alive

    found = [f"{role} {e[0]}" for role, e in rec.pids.items() if alive(e)]
    found += processes_mentioning(rec.id)
    if rec.dir in Path("/proc/mounts").read_text():
        found.append("a mount under the sandbox folder")
    if Path(rec.run_dir).exists():
        found.append(f"run folder {rec.run_dir}")
    for name in ("ram", "vmstate", "disks"):
        if (Path(rec.dir) / name).exists():
            found.append(name)
    if not rec.persistent and (Path(rec.dir) / "scratch.img").exists():
        found.append("the ephemeral scratch disk")
    return found


def slirp_helpers(parent: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if (
                int(fields[1]) == parent
                and fields[0] != "Z"
                and Path(f"/proc/{pid}/comm").read_text().strip() == "slirp4netns"
            ):
                found.append(int(pid))
    return found


def test_microvm_lifecycle(tmp_path: Path) -> None:
    from tlimage.builder import build_image

    (tmp_path / "image.py").write_text(IMAGE)
    build_image(tmp_path / "image.py", isolation="namespace")

    sb = Sandbox.create("vmrt", name="vm", backend="microvm", timeout=900)
    assert sb.status is Status.RUNNING and sb.info().backend == "microvm"

    r = sb.exec("sh", "-c", "cat greeting.txt; echo $APP_ENV; pwd; hostname")
    assert (r.exit_code, r.stdout) == (0, b"from the image\nprod\n/srv/app\nvm\n")
    with host_servers() as (lo_port, me, my_port):  # the host stays out of the guest's reach
        check_probe(sb.exec("sh", "-c", probe_script(lo_port, me, my_port)).stdout.decode(),
                    lo_port, me, my_port)  # fmt: skip
    helpers = slirp_helpers(sb.record.pids["shim"][0])
    assert len(helpers) == 1, helpers  # its network's helper, which ends with the shim
    r = sb.exec("sh", "-c", "id -u; tr a-z A-Z; exit 3", user="nobody", stdin=b"shout\n")
    assert (r.exit_code, r.stdout) == (3, b"65534\nSHOUT\n")
    with pytest.raises(ExecStartError, match="executable file not found"):
        sb.exec("no-such-program")
    # A client that gives up (timeout, Ctrl-C) leaves mid-request: the shim kills the command
    # and the next client is served at once.
    with pytest.raises(ExecTimeout):
        sb.exec("sleep", "300", timeout=1)
    t0 = time.monotonic()
    assert sb.exec("sh", "-c", "ps | grep -c 'sleep 30[0]'").stdout == b"0\n"
    assert time.monotonic() - t0 < 60

    (tmp_path / "in.txt").write_text("copied in\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("deep\n")
    assert sb.cp_in(tmp_path / "in.txt", "/tmp/") == "/tmp/in.txt"
    assert sb.cp_in(tmp_path / "tree", "/opt") == "/opt"
    assert sb.exec("cat", "/tmp/in.txt", "/opt/sub/f").stdout == b"copied in\ndeep\n"
    assert sb.cp_out("/srv/app/greeting.txt", tmp_path).read_text() == "from the image\n"
    sb.cp_out("/opt", tmp_path / "opt-copy")
    assert (tmp_path / "opt-copy" / "sub" / "f").read_text() == "deep\n"

    # Suspend saves the memory: a background process and its state survive, the VM does not
    # run meanwhile, and the guest clock is set right on resume.
    sb.exec("sh", "-c", "n=0; while true; do n=$((n+1)); echo $n > /tmp/ticks; sleep 0.2; done "
            ">/dev/null 2>&1 &")  # fmt: skip
    before = sb.record.pids
    res = sb.suspend()
    assert res.memory_snapshot and sb.status is Status.SUSPENDED
    assert not any(_alive(e) for e in before.values()) and processes_mentioning(sb.id) == []
    assert not [p for p in helpers if Path(f"/proc/{p}").exists()]  # the network's helper too
    # The shim ended through its own exit (which closes the helper), not by a traceback: a
    # client hanging up after QEMU quit once crashed it, and the helper outlived it a while.
    assert "Traceback" not in (Path(sb.info().dir) / "shim.log").read_text()
    assert (Path(sb.info().dir) / "vmstate").exists() and (Path(sb.info().dir) / "ram").exists()
    sb.resume()
    assert sb.status is Status.RUNNING
    r = sb.exec("sh", "-c", "cat /tmp/in.txt; ps | grep -c 'while tru[e]'; date +%s")
    lines = r.stdout.decode().split()
    assert lines[:2] == ["copied", "in"] and lines[2] == "1"
    assert abs(int(lines[3]) - time.time()) < 30
    with host_servers() as (lo_port, me, my_port):  # a resumed VM gets a fresh, fenced network
        check_probe(sb.exec("sh", "-c", probe_script(lo_port, me, my_port)).stdout.decode(),
                    lo_port, me, my_port)  # fmt: skip

    img = sb.snapshot(register="vmrt-snap")
    assert img.ref == "vmrt-snap:latest" and sb.status is Status.RUNNING
    assert sb.exec("echo", "thawed").stdout == b"thawed\n"  # FREEZE was undone

    twin = sb.clone()
    assert twin.record.backend == "microvm" and twin.record.source == sb.id
    assert twin.exec("cat", "/tmp/in.txt", "greeting.txt").stdout == b"copied in\nfrom the image\n"

    # The entrypoint runs in the background with its output on the console; the timeout
    # (running time, counted from the end of the boot) ends the sandbox.
    ep = Sandbox.create(
        "vmrt",
        backend="microvm",
        timeout=3,
        entrypoint=["sh", "-c", "echo entry started; cat greeting.txt; sleep 600"],
    )
    assert ep.wait(120) is Status.TERMINATED
    info = ep.info()
    assert info.reason == "timeout"
    console = (Path(info.dir) / "console.log").read_text()
    assert "entry started\nfrom the image\n" in console

    # A crashed shim takes QEMU with it; reconcile notices.
    os.kill(twin.record.pids["shim"][0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(twin.record.pids["qemu"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    reconcile()
    assert twin.status is Status.TERMINATED and "unexpectedly" in (twin.info().reason or "")

    sb.terminate()
    for s in (sb, twin, ep):
        rec = s.refresh()
        assert rec.status is Status.TERMINATED
        assert leftovers(rec) == [], rec.id
    assert (Path(sb.record.dir) / "scratch.img").exists()  # named: its disk is kept
    sb.remove()
    assert not Path(sb.record.dir).exists()


def _alive(entry) -> bool:  # noqa: ANN001
    from tlimage.sandbox.proc import alive

    return alive(entry)
