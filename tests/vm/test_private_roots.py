"""Issue #11 end to end: with TLIMAGE_CACHE_DIR and TLIMAGE_STATE_DIR in a folder every host user
can enter, a namespace build step and a namespace sandbox (with a user namespace where the host
has one) still work, and an unprivileged host user can list or read nothing below the cache
root, the state root or the run root: not the unpacked layers, not the sandbox's upper."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage.runtime import Sandbox, Status

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("setpriv") is None,
                       reason="util-linux (setpriv) is not installed"),
]  # fmt: skip

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
IMAGE = """\
from tlimage import Image

image = Image("priv", base_image="busybox").run(
    "echo 'a secret baked into the image' > /secret.txt && chmod 644 /secret.txt"
)
"""

# Run as nobody: every path given on stdin that could be listed or opened, one a line.
PROBE = """
import os, sys
for p in sys.stdin.read().split("\\0"):
    if not p:
        continue
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            os.listdir(p)
        else:
            os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        print(p)
    except OSError:
        pass
"""


@pytest.fixture
def open_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="tl-private-"))
    os.chmod(base, 0o755)  # every host user may enter: only tlimage's own modes keep them out
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(base / "state"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def below(*roots: Path) -> list[str]:
    paths = []
    for root in roots:
        for d, dirs, files in os.walk(root):
            paths.append(d)
            paths.extend(os.path.join(d, n) for n in dirs + files)
    return paths


def reachable_by_nobody(paths: list[str]) -> list[str]:
    p = subprocess.run([*NOBODY, sys.executable, "-I", "-c", PROBE],
                       input="\0".join(paths), capture_output=True, text=True, check=True,
                       timeout=120)  # fmt: skip
    return p.stdout.split()


def test_build_and_sandbox_work_and_nobody_reaches_their_trees(open_base: Path) -> None:
    from tlimage.builder import build_image
    from tlimage.runtime._api import run_root

    (open_base / "image.py").write_text(IMAGE)
    build_image(open_base / "image.py", isolation="namespace")
    sb = Sandbox.create("priv:latest", backend="namespace", timeout=300)
    try:
        assert sb.status is Status.RUNNING
        r = sb.exec("sh", "-c", "cat /secret.txt; echo mine > /upper.txt; chmod 644 /upper.txt")
        assert r.exit_code == 0 and r.stdout == b"a secret baked into the image\n"
        cache, state = open_base / "cache", open_base / "state"
        uppers = [p for p in state.rglob("upper.txt")]
        layers = [p for p in cache.rglob("secret.txt")]
        assert uppers and layers, "the test looks for files that are not where it thinks"
        # The probe sees what nobody can reach: the base folder and the image's source.
        src = [str(open_base), str(open_base / "image.py")]
        assert reachable_by_nobody(src) == src
        paths = below(cache, state, run_root())
        assert len(paths) > 100
        seen = reachable_by_nobody(paths)
        assert seen == [], json.dumps(seen[:20], indent=1)
    finally:
        sb.terminate()
