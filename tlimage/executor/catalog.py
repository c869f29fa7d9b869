"""The base image catalog: one table of the bases tlimage builds itself.

Each row says what a base is (distribution, suite, variant, packages, init) and nothing about
how it is built; `tlimage.executor.bases` turns a row into a root filesystem with mmdebstrap
(busybox: from the host's busybox-static). `RECIPE_VERSION` is part of every base's key: bump
it when a recipe changes in a way the row does not show, and every base is rebuilt once.

A built base is pinned by the digest of its layer (`tl sbx image bases` prints it; `FROM
debian-minimal@<digest>` fails when the base no longer has that content).

This module is plain data with no imports from the package, so the front ends, the builder and
the CLI can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPE_VERSION = 2

# Settings an Ubuntu base needs (an Ubuntu archive is not configured by default).
UBUNTU_MIRROR_ENV = "TLIMAGE_UBUNTU_MIRROR"
UBUNTU_KEYRING_ENV = "TLIMAGE_UBUNTU_KEYRING"
UBUNTU_SUITE_ENV = "TLIMAGE_UBUNTU_SUITE"
DEBIAN_MIRROR_ENV = "TLIMAGE_DEBIAN_MIRROR"
DEFAULT_UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The image config of every Debian/Ubuntu base. PIP_BREAK_SYSTEM_PACKAGES: the bases keep
# Debian's PEP 668 marker on their system Python, and `pip install x` works the same in build
# steps and in sandboxes (a venv works too).
DEB_ENV: tuple[tuple[str, str], ...] = (
    ("PATH", BASE_PATH), ("LANG", "C.UTF-8"), ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
)  # fmt: skip

_MINIMAL = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
_SYSTEMD = _MINIMAL + ("systemd", "systemd-sysv", "dbus", "iproute2", "procps")
_DESKTOP = ("xfce4", "xfce4-terminal", "tigervnc-standalone-server", "tigervnc-tools",
            "dbus-x11", "x11-apps", "xauth", "fonts-dejavu-core")  # fmt: skip


@dataclass(frozen=True)
class BaseSpec:
    name: str
    distribution: str  # debian | ubuntu | busybox
    suite: str  # the archive suite (Ubuntu: TLIMAGE_UBUNTU_SUITE overrides it)
    variant: str  # minimal | systemd | vnc | tiny
    packages: tuple[str, ...]  # installed on top of mmdebstrap's minbase
    init: str  # none: the sandbox agent is PID 1; systemd: systemd is
    cmd: tuple[str, ...]
    components: tuple[str, ...] = ("main",)
    summary: str = ""

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return (("PATH", BASE_PATH),) if self.distribution == "busybox" else DEB_ENV


CATALOG: tuple[BaseSpec, ...] = (
    BaseSpec(
        "debian-minimal",
        "debian",
        "trixie",
        "minimal",
        _MINIMAL,
        "none",
        ("/bin/bash",),
        summary="Debian 13: Python 3 (PEP 668), pip, python -> python3, ca-certificates",
    ),
    BaseSpec(
        "debian-systemd",
        "debian",
        "trixie",
        "systemd",
        _SYSTEMD,
        "systemd",
        ("/bin/bash",),
        summary="debian-minimal + systemd as init, dbus",
    ),
    BaseSpec(
        "debian-vnc",
        "debian",
        "trixie",
        "vnc",
        _SYSTEMD + _DESKTOP + ("firefox-esr",),
        "systemd",
        ("/bin/bash",),
        summary="debian-systemd + XFCE, TigerVNC server (:1, port 5901), Firefox ESR",
    ),
    BaseSpec(
        "ubuntu-minimal",
        "ubuntu",
        "noble",
        "minimal",
        _MINIMAL,
        "none",
        ("/bin/bash",),
        ("main", "universe"),
        summary="Ubuntu 24.04: Python 3 (PEP 668), pip, python -> python3, ca-certs",
    ),
    BaseSpec(
        "ubuntu-systemd",
        "ubuntu",
        "noble",
        "systemd",
        _SYSTEMD,
        "systemd",
        ("/bin/bash",),
        ("main", "universe"),
        summary="ubuntu-minimal + systemd as init, dbus",
    ),
    # Ubuntu's firefox and chromium are snap packages; GNOME Web is the browser that is a deb.
    BaseSpec(
        "ubuntu-vnc",
        "ubuntu",
        "noble",
        "vnc",
        _SYSTEMD + _DESKTOP + ("epiphany-browser",),
        "systemd",
        ("/bin/bash",),
        ("main", "universe"),
        summary="ubuntu-systemd + XFCE, TigerVNC server (:1, port 5901), GNOME Web",
    ),
    BaseSpec(
        "busybox",
        "busybox",
        "",
        "tiny",
        ("busybox-static",),
        "none",
        ("/bin/sh",),
        summary="busybox applets only (~2 MB; for tests)",
    ),
)

BY_NAME: dict[str, BaseSpec] = {b.name: b for b in CATALOG}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def spec(name: str) -> BaseSpec | None:
    return BY_NAME.get(name)


def ubuntu_configured(environ: dict[str, str] | None = None) -> bool:
    import os

    return bool((environ if environ is not None else os.environ).get(UBUNTU_MIRROR_ENV))


def default_base(environ: dict[str, str] | None = None) -> str:
    """`ubuntu-minimal` when an Ubuntu mirror is configured, else `debian-minimal`."""
    return "ubuntu-minimal" if ubuntu_configured(environ) else "debian-minimal"


def default_base_reason(environ: dict[str, str] | None = None) -> str:
    name = default_base(environ)
    if name == "ubuntu-minimal":
        return f"default base: ubuntu-minimal ({UBUNTU_MIRROR_ENV} is set)"
    return f"default base: debian-minimal (set {UBUNTU_MIRROR_ENV} for ubuntu-minimal)"
