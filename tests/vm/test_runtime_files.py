"""`sb.files` and `tl sbx fs` on both backends (the microVM: one VM for the module, the agent
resolving paths with openat2): metadata, reads and writes, and paths that resolve inside the
sandbox's root whatever links the sandbox planted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.conftest import module_microvm, sandbox_on_backend
from tlimage.errors import RuntimeError_

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip


IMAGE = ('from tlimage import Image\nimage = Image("{name}", base_image="busybox")'
         '.run("mkdir -p /srv && echo in-image > /srv/a.txt")\n')  # fmt: skip


@pytest.fixture(scope="module")
def vm_sandbox(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with module_microvm(tmp_path_factory, "files-vm", IMAGE) as got:
        yield got


@pytest.fixture(params=["namespace", "microvm"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    with sandbox_on_backend(request, tmp_path, "files", IMAGE) as sb:
        yield sb


def test_files_api(sandbox, tmp_path: Path) -> None:  # noqa: ANN001
    f = sandbox.files
    info = f.write("/srv/new.bin", b"\x00\x01data", mode=0o600)
    assert (info.type, info.size, info.mode, info.uid) == ("file", 6, 0o600, 0)
    assert f.read("/srv/new.bin") == b"\x00\x01data"
    assert f.read("/srv/a.txt") == b"in-image\n"
    f.write("/srv/a.txt", "replaced")
    assert sandbox.exec("cat", "/srv/a.txt").stdout == b"replaced"
    d = f.mkdir("/srv/d/e", parents=True)
    assert d.type == "dir" and d.mode == 0o755
    sandbox.exec("sh", "-c", "ln -s /srv/a.txt /srv/link && chown 12:34 /srv/new.bin")
    entries = {e.name: e for e in f.list("/srv")}
    assert sorted(entries) == ["a.txt", "d", "link", "new.bin"]
    assert entries["link"].type == "symlink" and entries["link"].link_target == "/srv/a.txt"
    assert (entries["new.bin"].uid, entries["new.bin"].gid) == (12, 34)
    assert entries["d"].mode_str == "drwxr-xr-x" and entries["a.txt"].mtime > 0
    assert f.read("/srv/link") == b"replaced"  # followed, inside the sandbox
    with pytest.raises(RuntimeError_, match="Directory not empty"):
        f.remove("/srv/d")
    f.remove("/srv/d", recursive=True)
    f.remove("/srv/link")
    assert not f.exists("/srv/d") and not f.exists("/srv/link") and f.exists("/srv/a.txt")
    with pytest.raises(RuntimeError_, match="No such file"):
        f.read("/srv/missing")
    with pytest.raises(RuntimeError_, match="is a directory"):
        f.write("/srv", "x")
    with pytest.raises(RuntimeError_, match="must be absolute"):
        f.list("srv")


def test_planted_links_stay_inside_the_root(sandbox, tmp_path: Path) -> None:  # noqa: ANN001
    host_secret = tmp_path / "host-only.txt"
    host_secret.write_text("host data")
    sandbox.exec("sh", "-c", f"ln -s {tmp_path} /escape && ln -s ../../../../../.. /up "
                             f"&& ln -s {host_secret} /file-escape")  # fmt: skip
    f = sandbox.files
    with pytest.raises(RuntimeError_, match="No such file|not a directory"):
        f.list("/escape")
    assert {e.name for e in f.list("/up/")} == {e.name for e in f.list("/")}
    with pytest.raises(RuntimeError_, match="No such file"):
        f.read("/file-escape")
    if sandbox.info().backend == "namespace":
        with pytest.raises(RuntimeError_, match="No such file"):
            f.write("/file-escape", "written in the sandbox")  # the link dangles in the sandbox
    else:  # the guest's tar replaces the link by the file, as cp into the microVM does
        f.write("/file-escape", "written in the sandbox")
        assert f.stat("/file-escape").type == "file"
    assert host_secret.read_text() == "host data"
    with pytest.raises(RuntimeError_):
        f.write(f"/up{tmp_path}/planted.txt", "x")
    assert not (tmp_path / "planted.txt").exists()


def test_cli_fs(sandbox, tmp_path: Path) -> None:  # noqa: ANN001
    def tl(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              input=stdin, timeout=120)  # fmt: skip

    sid = sandbox.id
    assert (
        tl("sbx", "fs", "write", sid, "/srv/w.txt", "--mode", "640", stdin=b"hi\n").returncode == 0
    )
    assert tl("sbx", "fs", "cat", sid, "/srv/w.txt").stdout == b"hi\n"
    assert tl("sbx", "fs", "mkdir", "-p", sid, "/srv/p/q").returncode == 0
    st = json.loads(tl("sbx", "fs", "stat", "--json", sid, "/srv/w.txt").stdout)
    assert (st["type"], st["mode"], st["size"]) == ("file", "0640", 3)
    ls = tl("sbx", "fs", "ls", sid, "/srv").stdout.decode()
    assert "-rw-r----- 0 0 3" in ls and ls.rstrip().endswith("w.txt")
    assert tl("sbx", "fs", "rm", "-r", sid, "/srv/p").returncode == 0
    bad = tl("sbx", "fs", "cat", sid, "/srv/p")
    assert bad.returncode == 1 and b"No such file" in bad.stderr and b"Traceback" not in bad.stderr
