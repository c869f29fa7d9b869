"""Secrets: `tl secrets set` stores a value per project, `tl sbx new --secret NAME` passes it
to every exec and to the entrypoint, and the value is found nowhere else — not in the state
folder beside the store, not in the layer cache, snapshots or clones, not in any process's
argument vector, not in what the CLI prints. On the microVM (one VM boot) a named sandbox's RAM
file is private and removed at terminate, and a memory clone or checkpoint, which would copy the
value, is refused unless asked for with --with-secrets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip

VALUE = "s3cr3t-7f2c9a41-value"


def _tl(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          input=stdin, timeout=180, cwd=cwd)  # fmt: skip


def _files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            try:
                if _contains(p, needle):
                    hits.append(str(p.relative_to(root)))
            except OSError:
                continue
    return sorted(hits)


def _contains(path: Path, needle: bytes, chunk: int = 4 << 20) -> bool:
    """Whether the file holds `needle`, read in chunks and skipping holes (a microVM's disk
    image is large and sparse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return False
            end = os.lseek(fd, off, os.SEEK_HOLE)
            pos = off
            while pos < end:
                data = os.pread(fd, min(chunk, end - pos) + len(needle), pos)
                if needle in data:
                    return True
                pos += chunk
            off = end
        return False
    finally:
        os.close(fd)


def _cmdlines_with(needle: bytes) -> list[str]:
    hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    hits.append(pid)
            except OSError:
                continue
    return hits


def test_secret_reaches_exec_and_nothing_else(tmp_path: Path) -> None:
    from tlimage.builder import build_image

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("sec", base_image="busybox").run("true")\n'
    )
    build_image(tmp_path / "image.py", isolation="namespace")
    tl = lambda *a, **k: _tl(tmp_path, *a, **k)  # noqa: E731

    outputs = []
    r = tl("secrets", "set", "API_KEY", stdin=VALUE + "\n")
    assert r.returncode == 0, r.stderr
    outputs.append(r)
    store = Path(os.environ["TLIMAGE_STATE_DIR"]) / "secrets" / "default.json"
    assert store.stat().st_mode & 0o777 == 0o600
    assert store.parent.stat().st_mode & 0o777 == 0o700
    outputs.append(tl("secrets", "set", "OTHER=plain"))
    outputs.append(ls := tl("secrets", "ls"))
    assert ls.stdout.split() == ["API_KEY", "OTHER"]
    missing = tl("sbx", "new", "--image", "sec:latest", "--backend", "namespace",
                 "--secret", "NOPE")  # fmt: skip
    assert missing.returncode == 1 and "no secret 'NOPE'" in missing.stderr

    new = tl("sbx", "new", "box", "--image", "sec:latest", "--backend", "namespace",
             "--secret", "API_KEY", "--timeout", "300")  # fmt: skip
    assert new.returncode == 0, new.stderr
    outputs.append(new)
    sid = new.stdout.strip()
    r = tl("sbx", "exec", sid, "sh", "-c", 'test "$API_KEY" = ' + VALUE + " && echo same")
    assert (r.returncode, r.stdout) == (0, "same\n"), r.stderr
    r = tl("sbx", "exec", sid, "sh", "-c", "echo ${OTHER:-unset}")
    assert r.stdout == "unset\n"  # only the names asked for

    outputs.append(info := tl("sbx", "info", "--json", sid))
    assert json.loads(info.stdout)["secret_names"] == ["API_KEY"]
    # The sandbox writes a file; a snapshot and a clone carry the file but not the secret.
    assert tl("sbx", "exec", sid, "sh", "-c", "echo data > /root/f").returncode == 0
    outputs.append(snap := tl("sbx", "snapshot", sid, "--register", "sec-snap"))
    assert snap.returncode == 0, snap.stderr
    outputs.append(clone := tl("sbx", "clone", sid))
    assert clone.returncode == 0, clone.stderr
    twin = clone.stdout.strip()
    r = tl("sbx", "exec", twin, "sh", "-c", 'cat /root/f; test "$API_KEY" = ' + VALUE)
    assert (r.returncode, r.stdout) == (0, "data\n")  # the clone keeps the name, reads the store
    outputs.append(tl("sbx", "ls", "--json"))
    for ref in (sid, twin):
        outputs.append(tl("sbx", "terminate", ref))

    state = Path(os.environ["TLIMAGE_STATE_DIR"])
    cache = Path(os.environ["TLIMAGE_CACHE_DIR"])
    assert _files_with(state, VALUE.encode()) == ["secrets/default.json"]
    assert _files_with(cache, VALUE.encode()) == []
    for o in outputs:
        assert VALUE not in o.stdout + o.stderr

    assert tl("secrets", "rm", "API_KEY").returncode == 0
    assert _files_with(state, VALUE.encode()) == []
    gone = tl("sbx", "exec", "box", "true")
    assert gone.returncode == 1


def test_secret_never_in_argv(tmp_path: Path) -> None:
    from tlimage.builder import build_image
    from tlimage.runtime import Sandbox, set_secret

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("sec3", base_image="busybox").run("true")\n'
    )
    build_image(tmp_path / "image.py", isolation="namespace")
    set_secret("API_KEY", VALUE)
    with Sandbox.create("sec3", backend="namespace", secret_names=["API_KEY"]) as sb:
        seen: list[list[str]] = []
        run = threading.Thread(target=lambda: sb.exec("sleep", "2"))
        run.start()
        for _ in range(15):
            seen.append(_cmdlines_with(VALUE.encode()))
            threading.Event().wait(0.1)
        run.join()
        assert not any(seen), f"the value is in the argv of pids {seen}"


def test_python_api_secret_names_and_removal(tmp_path: Path) -> None:
    from tlimage.builder import build_image
    from tlimage.errors import RuntimeError_
    from tlimage.runtime import Sandbox, list_secrets, remove_secret, set_secret

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("sec2", base_image="busybox").run("true")\n'
    )
    build_image(tmp_path / "image.py", isolation="namespace")
    set_secret("TOKEN", "abc def")
    assert list_secrets() == ["TOKEN"]
    with Sandbox.create("sec2", backend="namespace", secret_names=["TOKEN"]) as sb:
        assert sb.info().secret_names == ["TOKEN"]
        r = sb.exec("sh", "-c", 'echo "$TOKEN"', env={"X": "1"})
        assert r.stdout == b"abc def\n"
        assert sb.exec("sh", "-c", 'echo "$TOKEN"', env={"TOKEN": "mine"}).stdout == b"mine\n"
        set_secret("TOKEN", "rotated")
        assert sb.exec("sh", "-c", 'echo "$TOKEN"').stdout == b"rotated\n"
        remove_secret("TOKEN")
        with pytest.raises(RuntimeError_, match="'TOKEN' of this sandbox was removed"):
            sb.exec("true")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_microvm_secrets_reach_the_entrypoint_and_no_memory_copy_unasked(tmp_path: Path) -> None:
    """A named microVM keeps its RAM in a file: the file is private and goes at terminate, and a
    memory clone or checkpoint (which would copy the secret's value) needs --with-secrets."""
    import hashlib

    from tlimage.builder import build_image
    from tlimage.errors import RuntimeError_
    from tlimage.runtime import Sandbox, set_secret

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("secvm", base_image="busybox").run("true")\n'
    )
    build_image(tmp_path / "image.py", isolation="namespace")
    set_secret("API_KEY", VALUE)
    digest = hashlib.md5(VALUE.encode()).hexdigest()  # noqa: S324 - a fingerprint, not security
    check = 'printf %s "$API_KEY" | md5sum | cut -d" " -f1'
    outputs = []
    sb = Sandbox.create("secvm", name="vmbox", backend="microvm", timeout=900,
                        secret_names=["API_KEY"],
                        entrypoint=["sh", "-c", f"{check} > /tmp/ep; exec sleep 100000"])  # fmt: skip
    twin = None
    try:
        assert sb.exec("sh", "-c", check).stdout.decode().strip() == digest
        assert sb.exec("cat", "/tmp/ep").stdout.decode().strip() == digest  # the entrypoint's
        d = Path(sb.info().dir)
        assert d.stat().st_mode & 0o777 == 0o700 and (d / "ram").stat().st_mode & 0o777 == 0o600
        with pytest.raises(RuntimeError_, match="created with secrets") as e:
            sb.clone("vmtwin", memory=True)
        assert "--with-secrets" in (e.value.hint or "")
        with pytest.raises(RuntimeError_, match="created with secrets"):
            sb.save_memory("ckpt")
        outputs.append(r := _tl(tmp_path, "sbx", "clone", "vmbox", "--memory"))
        assert r.returncode == 1 and "--with-secrets" in r.stderr and "Traceback" not in r.stderr
        outputs.append(r := _tl(tmp_path, "sbx", "snapshot", "vmbox", "--memory"))
        assert r.returncode == 1 and "created with secrets" in r.stderr
        sb.snapshot(register="secvm-snap")  # the filesystem only: allowed, and secret-free
        twin = sb.clone("vmtwin", memory=True, with_secrets=True)  # asked for: it runs on
        assert twin.exec("sh", "-c", check).stdout.decode().strip() == digest
    finally:
        for s in (sb, twin):
            if s is not None:
                s.terminate()
    for s in (sb, twin):
        assert s is not None and not (Path(s.info().dir) / "ram").exists()
    state = Path(os.environ["TLIMAGE_STATE_DIR"])
    cache = Path(os.environ["TLIMAGE_CACHE_DIR"])
    assert _files_with(state, VALUE.encode()) == ["secrets/default.json"]
    assert _files_with(cache, VALUE.encode()) == []
    for o in outputs:
        assert VALUE not in o.stdout + o.stderr
