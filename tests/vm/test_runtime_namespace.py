"""Namespace sandboxes end to end: a busybox image built by the namespace executor is booted,
exec'd into, copied to and from, snapshotted, cloned, suspended, resumed and terminated; then
nothing of it may be left: no process, no mount, no cgroup, no ephemeral file."""

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

from tlimage.runtime import ExecStartError, Sandbox, Status, list_sandboxes, reconcile
from tlimage.runtime._state import StateDB

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip

IMAGE = """\
from tlimage import Image

image = (
    Image("rt", base_image="busybox")
    .run("mkdir -p /srv/app /home/app && echo 'from the image' > /srv/app/greeting.txt"
         " && echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd"
         " && echo 'app:x:1234:' >> /etc/group && chown 1234:1234 /home/app")
    .env("APP_ENV", "prod")
    .workdir("/srv/app")
)
"""


@pytest.fixture
def image(tmp_path: Path) -> str:
    from tlimage.builder import build_image

    (tmp_path / "image.py").write_text(IMAGE)
    build_image(tmp_path / "image.py", isolation="namespace")
    return "rt:latest"


def leftovers(rec) -> list[str]:  # noqa: ANN001 - a SandboxRecord
    """Processes, mounts and cgroups of a sandbox that still exist."""
    found = []
    for role, entry in rec.pids.items():
        from tlimage.sandbox.proc import alive

        if alive(entry):
            found.append(f"process {role} {entry[0]}")
    ns = rec.extra.get("pidns")
    if ns:
        from tlimage.sandbox.proc import pids_in_ns, proc_state

        found += [f"process {p} in its pid namespace" for p in pids_in_ns(ns)
                  if proc_state(p) not in ("Z", "X", None)]  # fmt: skip
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if (
                rec.id.encode() in cmd
                and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
            ):
                found.append(f"process {pid}: {cmd[:80]!r}")
            mounts = Path(f"/proc/{pid}/mounts").read_text()
        except OSError:
            continue
        if rec.dir in mounts:
            found.append(f"mount of {rec.dir} seen by pid {pid}")
    cg = rec.extra.get("cgroup") or {}
    found += [f"cgroup {d}" for d in (cg.get("dirs") or {}).values() if os.path.exists(d)]
    return found


def test_lifecycle_exec_cp_snapshot_clone_suspend_terminate(image: str, tmp_path: Path) -> None:
    sb = Sandbox.create(image, backend="namespace", timeout=300)
    assert sb.status is Status.RUNNING

    # The image's files, env and workdir; per-exec overrides; exit codes; users.
    r = sb.exec("sh", "-c", "cat greeting.txt; echo $APP_ENV; pwd")
    assert r.exit_code == 0 and r.stdout == b"from the image\nprod\n/srv/app\n"
    r = sb.exec("sh", "-c", "echo $APP_ENV $X; pwd; exit 3", env={"APP_ENV": "dev", "X": "1"},
                workdir="/tmp")  # fmt: skip
    assert (r.exit_code, r.stdout) == (3, b"dev 1\n/tmp\n")
    r = sb.exec("sh", "-c", "id -u; echo $HOME", user="app")
    assert r.stdout == b"1234\n/home/app\n"
    with pytest.raises(ExecStartError, match="executable file not found"):
        sb.exec("no-such-program")
    chunks = []
    sb.exec("sh", "-c", "echo out; echo err >&2", on_output=lambda s, b: chunks.append((s, b)))
    assert ("stdout", b"out\n") in chunks and ("stderr", b"err\n") in chunks

    # cp in (a file and a tree), cp out.
    (tmp_path / "in.txt").write_text("copied in\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("deep\n")
    os.symlink("sub/f", tmp_path / "tree" / "link")
    assert sb.cp_in(tmp_path / "in.txt", "/tmp") == "/tmp/in.txt"
    assert sb.cp_in(tmp_path / "tree", "/opt") == "/opt"
    assert sb.exec("cat", "/tmp/in.txt", "/opt/link").stdout == b"copied in\ndeep\n"
    out = sb.cp_out("/srv/app/greeting.txt", tmp_path)
    assert out == tmp_path / "greeting.txt" and out.read_text() == "from the image\n"
    sb.cp_out("/opt", tmp_path / "opt-copy")
    assert (tmp_path / "opt-copy" / "sub" / "f").read_text() == "deep\n"
    assert os.readlink(tmp_path / "opt-copy" / "link") == "sub/f"

    # Snapshot: image layers + one layer of the changes; a deletion is carried as a whiteout.
    sb.exec("rm", "/srv/app/greeting.txt")
    img = sb.snapshot(register="rt-snap:v1")
    assert img.ref == "rt-snap:v1" and sb.status is Status.RUNNING
    assert len(img.manifest.layers) == len(sb.record.extra["layers"]) + 1
    assert img.manifest.config["env"][-1] == "APP_ENV=prod"

    # Clone boots from a new snapshot: sees the copied files and the deletion.
    twin = sb.clone()
    assert twin.record.source == sb.id and twin.record.image_ref.startswith(sb.id + ":snap-")
    # ... which is not registered: only snapshots given a name show in `tl sbx image ls`.
    from tlimage.registry import Registry

    assert not any(r.name == sb.id for r in Registry().list())
    r = twin.exec("sh", "-c", "cat /tmp/in.txt; test -e greeting.txt || echo gone; echo $APP_ENV")
    assert r.stdout == b"copied in\ngone\nprod\n"

    # Suspend/resume needs a name; the namespace backend freezes in RAM.
    named = Sandbox.create(image, name="keeper", backend="namespace")
    named.exec("sh", "-c", "echo 1 > /tmp/counter")
    res = named.suspend()
    assert res.memory_snapshot is False and "cannot snapshot memory" in (res.note or "")
    assert named.status is Status.SUSPENDED
    assert [s.id for s in list_sandboxes() if s.record.status is Status.SUSPENDED] == [named.id]
    with pytest.raises(Exception, match="Suspended"):
        named.exec("true")
    named.resume()
    assert named.exec("cat", "/tmp/counter").stdout == b"1\n"
    with pytest.raises(Exception, match="only named sandboxes"):
        sb.suspend()

    recs = []
    for s in (sb, twin, named):
        recs.append(s.refresh())
        s.terminate()
        assert s.status is Status.TERMINATED
    for rec in recs:
        assert leftovers(rec) == [], rec.id
        fs = Path(rec.dir) / "fs"
        if rec.persistent:
            assert (fs / "upper" / "tmp" / "counter").read_text() == "1\n"
        else:
            assert not fs.exists()
    Sandbox.get("keeper").remove()
    assert not Path(recs[2].dir).exists()


def test_timeout_and_entrypoint_end_the_sandbox(image: str) -> None:
    sb = Sandbox.create(image, backend="namespace", timeout=1)
    ep = Sandbox.create(
        image,
        backend="namespace",
        entrypoint=["sh", "-c", "echo started; cat greeting.txt; exit 7"],
    )
    assert sb.wait(30) is Status.TERMINATED and ep.wait(30) is Status.TERMINATED
    info = sb.info()
    assert info.reason == "timeout" and info.terminated_at is not None
    assert info.terminated_at - info.created_at < 15
    einfo = ep.info()
    assert einfo.exit_code == 7 and einfo.reason == "entrypoint exited with code 7"
    assert (Path(einfo.dir) / "console.log").read_text() == "started\nfrom the image\n"
    for s in (sb, ep):
        assert leftovers(s.refresh()) == []


def _wait_dead(entry: list[int]) -> None:
    from tlimage.sandbox import proc as _proc

    deadline = time.monotonic() + 30
    while _proc.alive(entry) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_reconcile_after_crashes(image: str) -> None:
    db = StateDB()
    # The sandbox's processes die behind our back (OOM killer, kill -9): marked Terminated and
    # cleaned up on the next reconcile.
    a = Sandbox.create(image, backend="namespace")
    os.kill(a.record.pids["init"][0], signal.SIGKILL)
    _wait_dead(a.record.pids["init"])  # dead before reconcile looks, as after an OOM kill
    reconcile()
    assert a.status is Status.TERMINATED and "unexpectedly" in (a.info().reason or "")
    assert leftovers(a.record) == [] and not (Path(a.record.dir) / "fs").exists()

    # A snapshot whose CLI died while the sandbox was frozen: rolled back and thawed.
    b = Sandbox.create(image, name="frozen", backend="namespace")
    from tlimage.runtime.namespace import NamespaceBackend

    NamespaceBackend().freeze(b.record)
    db.transition(b.id, [Status.RUNNING], Status.SNAPSHOTTING, prev_status="Running",
                  op_pid=1, op_start=0)  # fmt: skip
    reconcile()
    assert b.status is Status.RUNNING
    assert b.exec("echo", "thawed").stdout == b"thawed\n"

    # A host reboot (a new boot id): namespace sandboxes do not survive it.
    db.update(b.id, boot_id="another-boot")
    reconcile()
    assert b.status is Status.TERMINATED and b.info().reason == "the host rebooted"
    assert leftovers(b.record) == []


def test_a_creator_killed_midway_leaves_nothing(image: str, tmp_path: Path) -> None:
    """SIGKILL the creating process at points of its start after the row exists (Pending):
    afterwards reconcile finds each sandbox Terminated, leaving nothing behind, or Running."""
    script = tmp_path / "create.py"
    script.write_text("from tlimage.runtime import Sandbox\n"
                      f"Sandbox.create({image!r}, backend='namespace')\n")  # fmt: skip
    db = StateDB()
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        before = {r.id for r in db.list()}
        p = subprocess.Popen([sys.executable, str(script)])
        deadline = time.monotonic() + 30
        while not {r.id for r in db.list()} - before and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        p.kill()
        p.wait()
    time.sleep(0.1)
    reconcile()
    recs = db.list()
    assert len(recs) == 5
    for rec in recs:
        s = Sandbox.get(rec.id)
        if s.status is Status.RUNNING:
            s.terminate()
        rec = s.refresh()
        assert rec.status is Status.TERMINATED
        assert leftovers(rec) == [], rec.id
    assert any(r.reason == "the process creating it died" for r in recs)


def test_cli_new_exec_cp_ls_terminate(image: str, tmp_path: Path) -> None:
    def tl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        code = ("import sys, tlimage.cli.sandbox; from tlimage.cli import main; "
                "sys.exit(main(sys.argv[1:]))")  # fmt: skip
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, input=stdin, timeout=120, cwd=tmp_path)  # fmt: skip

    new = tl("sbx", "new", "web", "--image", image, "--backend", "namespace", "--timeout", "300",
             "-e", "GREETING=hi")  # fmt: skip
    assert new.returncode == 0, new.stderr
    sid = new.stdout.strip()
    assert sid.startswith("sb-")
    r = tl(
        "sbx", "exec", "-w", "/tmp", "-e", "X=1", sid, "sh", "-c", "pwd; echo $X $GREETING; exit 5"
    )
    assert (r.returncode, r.stdout) == (5, "/tmp\n1 hi\n")
    r = tl("sbx", "exec", "--user", "app", "web", "id", "-un")
    assert (r.returncode, r.stdout) == (0, "app\n")
    r = tl("sbx", "exec", "-i", "web", "tr", "a-z", "A-Z", stdin="shout\n")
    assert r.stdout == "SHOUT\n"
    (tmp_path / "f.txt").write_text("x\n")
    assert tl("sbx", "cp", "f.txt", "web:/srv/app/").returncode == 0
    assert tl("sbx", "cp", "web:/srv/app/f.txt", "back.txt").returncode == 0
    assert (tmp_path / "back.txt").read_text() == "x\n"
    ls = json.loads(tl("sbx", "ls", "--json").stdout)
    assert ls["sandbox_id"] == sid and ls["status"] == "Running"
    assert ls["resources"]["cpus"] == 1.0
    info = json.loads(tl("sbx", "info", "--json", "web").stdout)
    documented = ["sandbox_id", "namespace", "status", "image", "resources", "secret_names",
                  "timeout_secs", "entrypoint", "created_at", "terminated_at"]  # fmt: skip
    assert list(info)[: len(documented)] == documented
    assert info["image"] == image and info["timeout_secs"] == 300 and info["namespace"] == "default"
    assert info["created_at"].endswith("Z") and info["terminated_at"] is None
    bad = tl("sbx", "exec", "web", "nope")
    assert bad.returncode == 127 and "executable file not found" in bad.stderr
    assert tl("sbx", "terminate", "web").returncode == 0
    gone = tl("sbx", "exec", "web", "true")
    assert gone.returncode == 1 and "Terminated" in gone.stderr
    assert "web" in tl("sbx", "ls", "--all").stdout
    rec = StateDB().get(sid)
    assert rec is not None and leftovers(rec) == []
    assert tl("sbx", "rm", "web").returncode == 0
    assert StateDB().get(sid) is None and not Path(rec.dir).exists()
