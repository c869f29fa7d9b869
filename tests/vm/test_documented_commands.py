"""The documented commands, verbatim and in order, as a new user copies them into a shell: build
the data-tools image registered as data-tools-image, start a sandbox from the default base with
the documented resources, start one from the image and import pandas and pyarrow with `python`.
Whatever `auto` picks here runs them (the microVM with KVM, else the namespace backend)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox backends need root"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None,
                       reason="mmdebstrap is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

IMAGE_PY = """\
from tensorlake.applications import Image

image = (
    Image(name="data-tools")
    .run("pip install pandas pyarrow jupyter")
    .run("mkdir -p /workspace/cache")
    .env("APP_ENV", "prod")
)
"""

# Each line as the documentation prints it; `tl` is this checkout's command.
SCRIPT = r"""
set -euo pipefail
tl() { "$PYTHON" -m tlimage "$@"; }

tl sbx image create image.py --name data-tools-image

SANDBOX_ID=$(tl sbx new --cpus 1.0 --memory 512 --timeout 300)
tl sbx exec "$SANDBOX_ID" python -c "print('default base ready')"
tl sbx exec "$SANDBOX_ID" pip install --quiet --no-deps six
tl sbx terminate "$SANDBOX_ID"

SANDBOX_ID=$(tl sbx new --image data-tools-image --cpus 1.0 --memory 512 --timeout 300)
tl sbx exec "$SANDBOX_ID" python -c "import pandas, pyarrow; print('ready')"
tl sbx terminate "$SANDBOX_ID"
"""


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except OSError:
        return False


def test_documented_commands_verbatim(tmp_path: Path) -> None:
    if not _reachable("https://pypi.org/simple/pandas/"):
        pytest.skip("pypi.org is not reachable (the image installs pandas, pyarrow, jupyter)")
    from tlimage.builder import hostca
    from tlimage.cache.store import default_cache_root

    (tmp_path / "image.py").write_text(IMAGE_PY)
    env = {**os.environ, "PYTHON": sys.executable,
           # The base and the pip layers are made once per machine, in the user's cache.
           "TLIMAGE_CACHE_DIR": os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE")
           or str(default_cache_root())}  # fmt: skip
    if hostca.wanted("auto") and (bundle := hostca.host_bundle()) is not None:
        # Behind a TLS-intercepting proxy the sandbox's pip needs the proxy's CA, as the
        # user's own machine would; builds get it from --host-ca auto.
        env["PIP_CERT"] = str(bundle)
        script = SCRIPT.replace(
            "pip install --quiet --no-deps six",
            "pip install --quiet --no-deps --cert /tmp/host-ca.pem six").replace(
            'tl sbx exec "$SANDBOX_ID" pip',
            f'tl sbx cp {bundle} "$SANDBOX_ID":/tmp/host-ca.pem\ntl sbx exec "$SANDBOX_ID" pip',
            1)  # fmt: skip
    else:
        script = SCRIPT
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=3000)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    lines = p.stdout.splitlines()
    assert "default base ready" in lines and "ready" in lines, p.stdout
    assert lines.index("default base ready") < lines.index("ready")
    assert "registered data-tools-image:latest" in p.stderr
    assert "Traceback" not in p.stderr
