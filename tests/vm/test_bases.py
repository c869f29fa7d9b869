"""The catalog's Debian bases, built for real with mmdebstrap from the Debian archive: modes and
owners exactly as the packages declare them (as a sandbox sees the base), `apt_install` works,
`python` is python3, pip behaves the same in build steps and sandboxes, the systemd variants
get a clear error on the namespace backend and boot systemd as PID 1 in the microVM (a unit
enabled at build time starts, systemd-run works), and debian-vnc's TigerVNC serves RFB and its
X tools take a screenshot of the XFCE desktop (debian-vnc is ~900 MB and ~5 minutes to build;
TLIMAGE_TEST_VNC=0 leaves it out)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from tlimage.errors import RuntimeError_

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
]

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The user's cache (computed before conftest gives each test its own): bases take a minute
    or more each to build, so they are made once."""
    from tlimage.cache.store import default_cache_root

    return Path(os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE") or default_cache_root())


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def archive() -> None:
    from tlimage.executor.bases import debian_mirror

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (scripts/setup.sh installs it)")
    if not _reachable(debian_mirror().rstrip("/") + "/dists/trixie/InRelease"):
        pytest.skip(f"the Debian archive {debian_mirror()} is not reachable")


def debian_bases() -> list[str]:
    from tlimage.executor import catalog

    names = [s.name for s in catalog.CATALOG if s.distribution == "debian" and s.variant != "vnc"]
    if os.environ.get("TLIMAGE_TEST_VNC") != "0":
        names.append("debian-vnc")
    return names


def sandbox(base: str, cache: Path, **kw):  # noqa: ANN201
    from tlimage import Sandbox  # the one that knows the base catalog

    return Sandbox.create(base, backend="namespace", cache_dir=cache, timeout=900, **kw)


def host_ca_env(sb) -> list[str]:  # noqa: ANN001
    """Behind a TLS-intercepting proxy (the host trusts extra CAs), the sandbox gets the host's
    bundle for pip, as build steps do with --host-ca auto."""
    from tlimage.builder import hostca

    bundle = hostca.host_bundle()
    if not hostca.wanted("auto") or bundle is None:
        return []
    sb.cp_in(bundle, "/etc/ssl/host-ca.pem")
    return ["PIP_CERT=/etc/ssl/host-ca.pem"]


def test_debian_minimal_modes_and_owners_are_the_packages(archive, shared_cache: Path) -> None:
    with sandbox("debian-minimal", shared_cache) as sb:
        sb.cp_in(HERE / "data" / "check_modes.py", "/root/")
        r = sb.exec("python3", "/root/check_modes.py", timeout=600)
        assert r.exit_code == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["packages"] > 50 and report["checked"] > 3000, report
        assert report["bad"] == [], "\n".join(report["bad"][:40])
        modes = sb.exec("stat", "-c", "%a %U %G %n", "/tmp", "/var/tmp", "/root").stdout.decode()
        assert modes.split("\n")[:3] == ["1777 root root /tmp", "1777 root root /var/tmp",
                                         "700 root root /root"]  # fmt: skip


@pytest.mark.parametrize("base", debian_bases())
def test_apt_install_works_on_the_base(base: str, archive, shared_cache: Path) -> None:
    from tlimage import Image
    from tlimage.builder import build_image

    events: list[dict] = []
    img = Image(f"apt-{base}", base_image=base).apt_install("jq").run("jq --version")
    result = build_image(img, emit=events.append, cache_dir=shared_cache,
                         isolation="namespace", register=False, no_cache=True)  # fmt: skip
    logs = "".join(e.get("data", "") for e in events if e["event"] == "build_log")
    assert "jq-1." in logs, logs[-2000:]
    assert len(result.manifest.layers) == 2  # the base, apt-get install (jq --version: none)


def test_python_is_python3_and_pip_works_in_a_sandbox(archive, shared_cache: Path) -> None:
    with sandbox("debian-minimal", shared_cache) as sb:
        r = sb.exec("python", "-c", "import sys, os; print(sys.version_info[:2], "
                    "os.environ['PIP_BREAK_SYSTEM_PACKAGES'])")  # fmt: skip
        assert r.exit_code == 0 and r.stdout.decode().strip() == "(3, 13) 1", r.stderr
        os_release = sb.exec("cat", "/etc/os-release").stdout.decode()
        assert 'VERSION_ID="13"' in os_release and "trixie" in os_release
        # The PEP 668 marker is kept: the environment, not a deleted file, lets pip install.
        marker = sb.exec("sh", "-c", "ls /usr/lib/python3*/EXTERNALLY-MANAGED").exit_code
        assert marker == 0
        if _reachable("https://pypi.org/simple/six/"):
            pip = sb.exec("pip", "install", "--quiet", "--no-deps", "six==1.16.0", timeout=300,
                          env=host_ca_env(sb))  # fmt: skip
            assert pip.exit_code == 0, pip.stderr
            assert sb.exec("python", "-c", "import six").exit_code == 0


def test_systemd_variant_on_the_namespace_backend_is_a_clear_error(
    archive, shared_cache: Path
) -> None:
    with pytest.raises(RuntimeError_, match="boots systemd as init, which the namespace"):
        sandbox("debian-systemd", shared_cache)


@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)",
)
def test_debian_minimal_in_the_microvm_keeps_modes_and_runs_python(
    archive, shared_cache: Path
) -> None:
    # The microVM gets its root filesystem from ext4 disks made of the layers: the same modes
    # (sticky /tmp, set-uid su) must reach it. One TCG boot.
    with microvm_sandbox("debian-minimal", shared_cache) as sb:
        r = sb.exec("sh", "-c", "stat -c '%a %U %n' /tmp /var/tmp /usr/bin/su; "
                    "python -c 'import sys; print(sys.version_info[0])'")  # fmt: skip
        assert r.exit_code == 0, r.stderr
        assert r.stdout.decode().split("\n")[:4] == [
            "1777 root /tmp",
            "1777 root /var/tmp",
            "4755 root /usr/bin/su",
            "3",
        ]


def microvm_sandbox(base: str, cache: Path):  # noqa: ANN201
    from tlimage import Sandbox  # the one that knows the base catalog

    return Sandbox.create(base, backend="microvm", cache_dir=cache, timeout=900, memory=512)


# A unit enabled at build time: it must start when the sandbox boots. The build step itself
# runs without systemd (as in Docker): PID 1 there is not systemd.
HELLO_UNIT = """[Unit]
Description=tlimage test unit enabled at build time
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c "echo booted > /run/tl-hello"
[Install]
WantedBy=multi-user.target
"""


@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)",
)
def test_debian_systemd_boots_systemd_as_pid1_in_the_microvm(archive, shared_cache: Path) -> None:
    import time

    from tlimage import Image, Sandbox
    from tlimage.builder import build_image

    events: list[dict] = []
    img = (Image("systemd-probe", base_image="debian-systemd")
           .run(f"printf '%s' '{HELLO_UNIT}' > /etc/systemd/system/tl-hello.service && "
                "systemctl enable tl-hello.service && "
                "echo \"build step PID 1: $(cat /proc/1/comm)\""))  # fmt: skip
    build_image(img, emit=events.append, cache_dir=shared_cache, isolation="namespace",
                no_cache=True)  # fmt: skip
    logs = "".join(e.get("data", "") for e in events if e["event"] == "build_log")
    assert "build step PID 1: " in logs and "build step PID 1: systemd" not in logs, logs[-2000:]

    # An image built FROM debian-systemd carries the base's init label: it boots systemd.
    sb = Sandbox.create("systemd-probe", backend="microvm", cache_dir=shared_cache,
                        timeout=900, memory=512)  # fmt: skip
    try:
        pid1 = sb.exec("cat", "/proc/1/comm")
        assert pid1.exit_code == 0 and pid1.stdout.decode().strip() == "systemd", pid1.stderr
        state = sb.exec("sh", "-c", "timeout 300 systemctl is-system-running --wait; "
                        "systemctl --failed --no-legend --plain", timeout=330)  # fmt: skip
        out = state.stdout.decode()
        print(out)  # the failed units, when degraded
        assert out.split("\n")[0] in ("running", "degraded"), (out, state.stderr)
        assert sb.exec("cat", "/run/tl-hello").stdout == b"booted\n"
        run = sb.exec(
            "sh",
            "-c",
            "systemd-run --unit=tl-sleep sleep 600 && "
            "systemctl is-active tl-sleep && systemctl show -p MainPID --value tl-sleep",
        )
        lines = run.stdout.decode().split()
        assert run.exit_code == 0 and lines[0] == "active", (run.stdout, run.stderr)
        # the unit's process is systemd's child, in the unit's cgroup
        cg = sb.exec("cat", f"/proc/{lines[1]}/cgroup").stdout.decode()
        assert "tl-sleep.service" in cg, cg
    finally:
        t0 = time.monotonic()
        sb.terminate()
        assert time.monotonic() - t0 < 30


VNC_PROBE = r"""
set -e
Xtigervnc :1 -geometry 1024x768 -depth 24 -SecurityTypes None -localhost yes -rfbport 5901 \
    >/tmp/vnc.log 2>&1 &
for i in $(seq 100); do [ -S /tmp/.X11-unix/X1 ] && break; sleep 0.2; done
python3 - <<'PY'
import socket
s = socket.create_connection(("127.0.0.1", 5901), timeout=10)
print("banner:", s.recv(12).decode().strip())
PY
export DISPLAY=:1 HOME=/root
dbus-launch --exit-with-session startxfce4 >/tmp/xfce.log 2>&1 &
sleep 8
xwd -root -silent -display :1 > /tmp/desktop.xwd
python3 -c "import os; print('screenshot bytes:', os.path.getsize('/tmp/desktop.xwd'))"
"""


@pytest.mark.skipif(
    os.environ.get("TLIMAGE_TEST_VNC") == "0",
    reason="TLIMAGE_TEST_VNC=0: debian-vnc (~900 MB, ~5 min to build) not tested",
)
def test_debian_vnc_serves_rfb_and_takes_a_screenshot(archive, shared_cache: Path) -> None:
    from tlimage import Image
    from tlimage.builder import build_image

    events: list[dict] = []
    img = Image("vnc-probe", base_image="debian-vnc").run(VNC_PROBE)
    build_image(img, emit=events.append, cache_dir=shared_cache, isolation="namespace",
                register=False, no_cache=True, step_timeout=600)  # fmt: skip
    logs = "".join(e.get("data", "") for e in events if e["event"] == "build_log")
    assert "banner: RFB 003.008" in logs, logs[-3000:]
    size = int(logs.split("screenshot bytes:")[1].split()[0])
    assert size > 1024 * 768 * 3, logs[-2000:]  # a 24-bit 1024x768 XWD dump


@pytest.mark.skipif(
    os.environ.get("TLIMAGE_TEST_VNC") == "0" or shutil.which("qemu-system-x86_64") is None,
    reason="TLIMAGE_TEST_VNC=0 (debian-vnc not tested) or qemu-system-x86 is not installed",
)
def test_debian_vnc_in_the_microvm_starts_its_desktop_units(archive, shared_cache: Path) -> None:
    # systemd (PID 1) starts the base's own units: TigerVNC on :1 and the XFCE session on it.
    from tlimage import Sandbox

    with Sandbox.create("debian-vnc", backend="microvm", cache_dir=shared_cache, timeout=1200,
                        memory=1024) as sb:  # fmt: skip
        # a unit restarted under load (Restart=on-failure) may still be activating: wait for it
        r = sb.exec("sh", "-c", "timeout 500 systemctl is-system-running --wait; "
                    "systemctl --failed --no-legend --plain; for i in $(seq 120); do "
                    "systemctl -q is-active tlimage-vnc && systemctl -q is-active tlimage-xfce "
                    "&& break; sleep 1; done; systemctl status --no-pager tlimage-vnc "
                    "tlimage-xfce >&2; systemctl is-active tlimage-vnc tlimage-xfce",
                    timeout=660)  # fmt: skip
        print(r.stdout.decode())
        lines = r.stdout.decode().split()
        assert lines[0] in ("running", "degraded") and lines[-2:] == ["active", "active"], (
            lines,
            r.stderr.decode()[-3000:],
        )
        probe = ("import socket; s = socket.create_connection(('127.0.0.1', 5901), timeout=60); "
                 "print(s.recv(12).decode().strip())")  # fmt: skip
        banner = sb.exec("python3", "-c", probe, timeout=120)
        assert banner.stdout.decode().strip() == "RFB 003.008", (banner.stdout, banner.stderr)
        shot = sb.exec("sh", "-c", "DISPLAY=:1 xwd -root -silent | wc -c", timeout=120)
        assert int(shot.stdout.decode() or 0) > 1280 * 800 * 3, shot.stderr  # the unit's 1280x800
