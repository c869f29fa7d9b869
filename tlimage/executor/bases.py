"""Base root filesystems, built by this tool on the host as plain directory trees, from the
table in `tlimage.executor.catalog`:

    busybox                  busybox-static and a passwd/group; ~2 MB, built in ~50 ms (tests)
    debian-minimal           mmdebstrap --variant=minbase trixie (Debian 13) + python3,
                             python3-pip, python-is-python3, ca-certificates; no init; ~25 s
    debian-systemd / -vnc    the same + systemd (+ XFCE, TigerVNC, Firefox ESR)
    ubuntu-*                 the same recipes on an Ubuntu suite, only when a mirror is configured

A built tree is kept at `<cache>/executor-v1/bases/<name>-<key>/`, where the key covers what
selects its content (recipe version, suite, mirror, packages, tool versions). The archive moves
on under the same key: a base is a snapshot taken once, pinned afterwards by the layer digest
that the cache computes from the tree; `ensure_base(..., refresh=True)` takes a new snapshot.

Modes are Debian's: mmdebstrap unpacks every package as dpkg does, so /tmp and /var/tmp are
1777 and every path has the mode and owner its package declares (tested against `dpkg-deb -c`).

PEP 668: Debian's python3 ships /usr/lib/python3.*/EXTERNALLY-MANAGED and it is kept; the
bases' environment sets PIP_BREAK_SYSTEM_PACKAGES=1 for build steps and sandboxes alike, so pip
installs into the image's system Python as a Dockerfile's `pip install` expects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tlimage import _layout
from tlimage.errors import ExecutorError
from tlimage.executor import catalog
from tlimage.executor.catalog import (
    BASE_PATH,
    DEBIAN_MIRROR_ENV,
    DEFAULT_DEBIAN_MIRROR,
    DEFAULT_UBUNTU_KEYRING,
    UBUNTU_KEYRING_ENV,
    UBUNTU_MIRROR_ENV,
    UBUNTU_SUITE_ENV,
)
from tlimage.sandbox.qemu.provision import bucket_dir, require_tool

BASES_FORMAT = "b1"
BASES = catalog.NAMES
DEBIAN_SUITE = catalog.BY_NAME["debian-minimal"].suite
DEBIAN_PACKAGES = catalog.BY_NAME["debian-minimal"].packages
DEFAULT_UBUNTU_SUITE = catalog.BY_NAME["ubuntu-minimal"].suite
# Every file of a tool-built base gets this mtime unless SOURCE_DATE_EPOCH says otherwise, so a
# rebuild yields the same tree key and the same layer digest.
DEFAULT_EPOCH = 0

__all__ = ["BASE_PATH", "DEBIAN_MIRROR_ENV", "UBUNTU_MIRROR_ENV", "UBUNTU_SUITE_ENV"]


class BaseError(ExecutorError):
    """A base rootfs could not be built (unknown name, missing tool or archive)."""


@dataclass(frozen=True)
class Base:
    name: str
    tree: Path  # a plain directory tree: the bottom lower layer
    env: tuple[tuple[str, str], ...]  # environment every build step on this base starts with
    key: str
    info: dict  # what went in: suite, mirror, packages, versions


def ubuntu_settings(name: str) -> tuple[str, str, str]:
    """(mirror, suite, keyring) of the configured Ubuntu archive, or a clear error naming both
    settings an Ubuntu base needs."""
    mirror = os.environ.get(UBUNTU_MIRROR_ENV, "")
    keyring = os.environ.get(UBUNTU_KEYRING_ENV, DEFAULT_UBUNTU_KEYRING)
    if not mirror or not Path(keyring).is_file():
        missing = []
        if not mirror:
            missing.append(f"{UBUNTU_MIRROR_ENV} (an Ubuntu archive URL) is not set")
        if not Path(keyring).is_file():
            missing.append(f"the keyring {keyring} ({UBUNTU_KEYRING_ENV}) does not exist")
        raise BaseError(
            f"{name} needs an Ubuntu archive: " + "; ".join(missing),
            hint=f"set {UBUNTU_MIRROR_ENV}=http://archive.ubuntu.com/ubuntu and "
            f"{UBUNTU_KEYRING_ENV}=<Ubuntu archive keyring .gpg> (apt-get install "
            f"ubuntu-keyring gives {DEFAULT_UBUNTU_KEYRING}); optionally {UBUNTU_SUITE_ENV} "
            f"(default {DEFAULT_UBUNTU_SUITE}). Without them the default base is debian-minimal",
        )
    suite = os.environ.get(UBUNTU_SUITE_ENV, catalog.BY_NAME[name].suite)
    return mirror, suite, keyring


def ensure_base(
    name: str, cache_dir: Path | None = None, *, refresh: bool = False, progress=None
) -> Base:
    """The base's tree, built on first use and cached."""
    say = progress or (lambda _m: None)
    spec = catalog.spec(name)
    if spec is None:
        raise BaseError(f"unknown base {name!r}; available: {', '.join(BASES)}")
    info = base_info(spec)
    key_s = base_key(spec, info)
    root = bucket_dir(_layout.BASES, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{key_s}"
    if refresh and final.exists():
        shutil.rmtree(final)
    if not (final / ".tlimage-base.json").is_file():
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
            tree = Path(tmp) / "tree"
            say(f"building base {name}")
            if spec.distribution == "busybox":
                build_busybox_base(tree)
            else:
                build_deb_base(tree, spec, info)
            out = Path(tmp) / "out"
            out.mkdir()
            os.rename(tree, out / "rootfs")
            (out / ".tlimage-base.json").write_text(
                json.dumps({"name": name, "key": key_s, "info": info, "env": spec.env}, indent=2)
                + "\n"
            )
            try:
                os.replace(out, final)
            except OSError:
                if not (final / ".tlimage-base.json").is_file():
                    raise
    return Base(name, final / "rootfs", spec.env, key_s, info)


def base_info(spec: catalog.BaseSpec) -> dict:
    """What selects a base's content (raises for an Ubuntu base without an archive)."""
    if spec.distribution == "busybox":
        info: dict = {"busybox": _busybox_version(_static_busybox())}
    elif spec.distribution == "debian":
        info = {
            "suite": spec.suite,
            "mirror": debian_mirror(),
            "packages": list(spec.packages),
            "recipe": catalog.RECIPE_VERSION,
        }
    else:
        mirror, suite, keyring = ubuntu_settings(spec.name)
        info = {
            "suite": suite,
            "mirror": mirror,
            "keyring": keyring,
            "packages": list(spec.packages),
            "recipe": catalog.RECIPE_VERSION,
        }
    info["epoch"] = _epoch()
    return info


def base_key(spec: catalog.BaseSpec, info: dict) -> str:
    blob = json.dumps([BASES_FORMAT, spec.name, info], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def built_tree(name: str, cache_dir: Path | None = None) -> Path | None:
    """The built tree of the base's current recipe, or None (never builds)."""
    spec = catalog.spec(name)
    if spec is None:
        return None
    try:
        key = base_key(spec, base_info(spec))
    except (BaseError, ExecutorError):
        return None
    final = bucket_dir(_layout.BASES, cache_dir) / f"{name}-{key}"
    return final / "rootfs" if (final / ".tlimage-base.json").is_file() else None


def _epoch() -> int:
    try:
        return int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    except ValueError:
        return DEFAULT_EPOCH


# --- busybox ---------------------------------------------------------------------------------


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _static_busybox() -> Path:
    path = require_tool("busybox", "to build the busybox base")
    real = Path(path).resolve()
    if not _is_static_elf(real):
        raise BaseError(
            f"{real} is not statically linked; the busybox base needs busybox-static",
            hint="apt-get install -y busybox-static",
        )
    return real


def _busybox_version(path: Path) -> str:
    out = subprocess.run([str(path)], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.split(" multi-call")[0].strip() or hashlib.sha256(path.read_bytes()).hexdigest()


def build_busybox_base(dest: Path) -> None:
    """A minimal rootfs: /bin/busybox with every applet linked where busybox installs it, root
    and nobody accounts, the usual top-level directories; all owned by root, mtime = epoch."""
    busybox = _static_busybox()
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    dest.mkdir(parents=True)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "home",
        "var/tmp",
        "run",
    ):
        (dest / d).mkdir(parents=True, exist_ok=True)
    # Every mode set explicitly: the base's layer must not depend on the builder's umask.
    for dirpath, _dirs, _files in os.walk(dest):
        os.chmod(dirpath, 0o755)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "var/tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    shutil.copyfile(busybox, dest / "bin/busybox")
    os.chmod(dest / "bin/busybox", 0o755)
    for applet in applets:
        target = dest / applet
        if target.name in ("busybox", "linuxrc") or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(dest / "bin/busybox", target.parent), target)
    (dest / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (dest / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc/hostname").write_text("tlimage\n")
    for name in ("passwd", "group", "hostname"):
        os.chmod(dest / "etc" / name, 0o644)
    _normalize_tree(dest, _epoch())


def _normalize_tree(root: Path, mtime: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            os.lchown(p, 0, 0)
            os.utime(p, (mtime, mtime), follow_symlinks=False)
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    os.utime(root, (mtime, mtime))


# --- Debian / Ubuntu via mmdebstrap ----------------------------------------------------------


def _mmdebstrap(
    dest: Path, suite: str, sources: list[str], packages: tuple[str, ...], extra: list[str]
) -> None:
    tool = require_tool("mmdebstrap", "to build Debian/Ubuntu base root filesystems")
    cmd = [
        tool,
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        "--include=" + ",".join(packages),
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        # The sandbox binds the host's resolv.conf/hosts over these while a step runs; empty
        # files keep the mount points inside the base instead of in every step's layer.
        '--customize-hook=: > "$1/etc/resolv.conf" && chmod 644 "$1/etc/resolv.conf"',
        "--customize-hook=printf '127.0.0.1 localhost\\n::1 localhost\\n' > \"$1/etc/hosts\"",
        '--customize-hook=rm -f "$1/etc/hostname" "$1/etc/machine-id"',
        *extra,
        suite,
        str(dest),
        *sources,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(_epoch())}
    p = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False
    )
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        raise BaseError(f"mmdebstrap failed (exit {p.returncode}) building {suite}:\n{tail}")


# systemd variants: an empty machine-id is filled at first boot; the VNC server runs on :1 as
# root with no password, listening on the sandbox's own network only.
_SYSTEMD_HOOKS = [
    '--customize-hook=: > "$1/etc/machine-id"',
    '--customize-hook=chroot "$1" systemctl set-default multi-user.target',
    '--customize-hook=chroot "$1" systemctl mask systemd-networkd-wait-online.service '
    "getty@tty1.service serial-getty@ttyS0.service",
]
_VNC_UNIT = """[Unit]
Description=TigerVNC server on :1 (XFCE)
After=network.target

[Service]
Type=simple
Environment=HOME=/root
ExecStart=/usr/bin/Xtigervnc :1 -geometry 1280x800 -depth 24 -SecurityTypes None -localhost no -rfbport 5901 -AlwaysShared
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""
_XFCE_UNIT = """[Unit]
Description=XFCE session on the VNC display :1
After=tlimage-vnc.service
Requires=tlimage-vnc.service

[Service]
Type=simple
Environment=HOME=/root DISPLAY=:1
ExecStartPre=/bin/sh -c 'for i in $(seq 50); do [ -S /tmp/.X11-unix/X1 ] && exit 0; sleep 0.2; done'
ExecStart=/usr/bin/dbus-launch --exit-with-session /usr/bin/startxfce4
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def _unit_hook(name: str, text: str) -> str:
    quoted = text.replace("'", "'\\''")
    return (
        f"--customize-hook=printf '%s' '{quoted}' > \"$1/etc/systemd/system/{name}\" && "
        f'chroot "$1" systemctl enable {name}'
    )


def _variant_hooks(spec: catalog.BaseSpec) -> list[str]:
    hooks: list[str] = []
    if spec.init == "systemd":
        hooks += _SYSTEMD_HOOKS
    if spec.variant == "vnc":
        hooks += [
            _unit_hook("tlimage-vnc.service", _VNC_UNIT),
            _unit_hook("tlimage-xfce.service", _XFCE_UNIT),
        ]
    return hooks


def build_deb_base(dest: Path, spec: catalog.BaseSpec, info: dict) -> None:
    comps = " ".join(spec.components)
    if spec.distribution == "debian":
        mirror, suite = info["mirror"], info["suite"]
        security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
        sources = [
            f"deb {mirror} {suite} {comps}",
            f"deb {mirror} {suite}-updates {comps}",
            f"deb {security} {suite}-security {comps}",
        ]
        extra: list[str] = []
    else:
        mirror, suite = info["mirror"], info["suite"]
        sources = [f"deb {mirror} {suite} {comps}", f"deb {mirror} {suite}-updates {comps}"]
        extra = [f"--keyring={info['keyring']}"]
    _mmdebstrap(dest, suite, sources, spec.packages, extra + _variant_hooks(spec))


def debian_mirror() -> str:
    return os.environ.get(DEBIAN_MIRROR_ENV, DEFAULT_DEBIAN_MIRROR)


def build_debian_base(dest: Path, *, suite: str = DEBIAN_SUITE, mirror: str | None = None) -> None:
    spec = catalog.BY_NAME["debian-minimal"]
    build_deb_base(dest, spec, {"mirror": mirror or debian_mirror(), "suite": suite})
