"""Base root filesystems, built by this tool on the host as plain directory trees.

    busybox          busybox-static and a passwd/group; ~2 MB, built in ~50 ms (tests)
    debian-minimal   mmdebstrap --variant=minbase bookworm + python3, python3-pip,
                     ca-certificates; no init system; ~40 s and ~180 MB
    ubuntu-minimal   the same from an Ubuntu archive, only when one is configured

A built tree is kept at `<cache>/executor-v1/bases/<name>-<key>/`, where the key covers what
selects its content (suite, mirror, packages, tool versions). The Debian archive moves on under
the same key: a base is a snapshot taken once, pinned afterwards by the layer digest that the
cache computes from the tree; `ensure_base(..., refresh=True)` takes a new snapshot.

PEP 668: Debian's python3 ships /usr/lib/python3.*/EXTERNALLY-MANAGED and it is kept; build
steps get PIP_BREAK_SYSTEM_PACKAGES=1 from `Base.env` instead, so pip installs into the image's
system Python as a Dockerfile's `pip install` expects.
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

from tlimage.errors import ExecutorError
from tlimage.sandbox.qemu.provision import executor_dir, require_tool

BASES_FORMAT = "b1"
BASES = ("busybox", "debian-minimal", "ubuntu-minimal")
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "ca-certificates")
DEBIAN_MIRROR_ENV = "TLIMAGE_DEBIAN_MIRROR"
UBUNTU_MIRROR_ENV = "TLIMAGE_UBUNTU_MIRROR"
UBUNTU_SUITE_ENV = "TLIMAGE_UBUNTU_SUITE"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEFAULT_UBUNTU_SUITE = "noble"
# Every file of a tool-built base gets this mtime unless SOURCE_DATE_EPOCH says otherwise, so a
# rebuild yields the same tree key and the same layer digest.
DEFAULT_EPOCH = 0

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BaseError(ExecutorError):
    """A base rootfs could not be built (unknown name, missing tool or archive)."""


@dataclass(frozen=True)
class Base:
    name: str
    tree: Path  # a plain directory tree: the bottom lower layer
    env: tuple[tuple[str, str], ...]  # environment every build step on this base starts with
    key: str
    info: dict  # what went in: suite, mirror, packages, versions


def ensure_base(name: str, cache_dir: Path | None = None, *, refresh: bool = False,
                progress=None) -> Base:
    """The base's tree, built on first use and cached."""
    say = progress or (lambda _m: None)
    if name not in BASES:
        raise BaseError(f"unknown base {name!r}; available: {', '.join(BASES)}")
    if name == "busybox":
        info = {"busybox": _busybox_version(_static_busybox())}
        env: tuple[tuple[str, str], ...] = (("PATH", BASE_PATH),)
    elif name == "debian-minimal":
        info = {"suite": DEBIAN_SUITE, "mirror": debian_mirror(), "packages": DEBIAN_PACKAGES}
        env = (("PATH", BASE_PATH), ("LANG", "C.UTF-8"), ("PIP_BREAK_SYSTEM_PACKAGES", "1"))
    else:
        mirror = os.environ.get(UBUNTU_MIRROR_ENV)
        if not mirror:
            raise BaseError(
                "ubuntu-minimal needs an Ubuntu archive, and none is configured",
                hint=f"set {UBUNTU_MIRROR_ENV} to an Ubuntu mirror URL (and optionally "
                f"{UBUNTU_SUITE_ENV}, default {DEFAULT_UBUNTU_SUITE}); the default base here "
                "is debian-minimal",
            )
        info = {"suite": os.environ.get(UBUNTU_SUITE_ENV, DEFAULT_UBUNTU_SUITE),
                "mirror": mirror, "packages": DEBIAN_PACKAGES}
        env = (("PATH", BASE_PATH), ("LANG", "C.UTF-8"), ("PIP_BREAK_SYSTEM_PACKAGES", "1"))
    info["epoch"] = _epoch()
    key = hashlib.sha256(json.dumps([BASES_FORMAT, name, info], sort_keys=True).encode())
    key_s = key.hexdigest()[:16]
    root = executor_dir(cache_dir) / "bases"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{key_s}"
    if refresh and final.exists():
        shutil.rmtree(final)
    if not (final / ".tlimage-base.json").is_file():
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
            tree = Path(tmp) / "tree"
            say(f"building base {name}")
            if name == "busybox":
                build_busybox_base(tree)
            elif name == "debian-minimal":
                build_debian_base(tree, suite=info["suite"], mirror=info["mirror"])
            else:
                build_ubuntu_base(tree, suite=info["suite"], mirror=info["mirror"])
            out = Path(tmp) / "out"
            out.mkdir()
            os.rename(tree, out / "rootfs")
            (out / ".tlimage-base.json").write_text(json.dumps(
                {"name": name, "key": key_s, "info": info, "env": env}, indent=2) + "\n")
            try:
                os.replace(out, final)
            except OSError:
                if not (final / ".tlimage-base.json").is_file():
                    raise
    return Base(name, final / "rootfs", env, key_s, info)


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
        phoff, = struct.unpack_from("<Q", head, 32)
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
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    dest.mkdir(parents=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp", "root",
              "home", "var/tmp", "run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
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
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (dest / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc/hostname").write_text("tlimage\n")
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


def debian_mirror() -> str:
    return os.environ.get(DEBIAN_MIRROR_ENV, DEFAULT_DEBIAN_MIRROR)


def _mmdebstrap(dest: Path, suite: str, sources: list[str], extra: list[str]) -> None:
    tool = require_tool("mmdebstrap", "to build Debian/Ubuntu base root filesystems")
    cmd = [tool, "--variant=minbase", "--mode=root", "--format=directory",
           "--include=" + ",".join(DEBIAN_PACKAGES),
           "--dpkgopt=path-exclude=/usr/share/doc/*",
           "--dpkgopt=path-include=/usr/share/doc/*/copyright",
           "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*",
           # The sandbox binds the host's resolv.conf/hosts over these while a step runs; empty
           # files keep the mount points inside the base instead of in every step's layer.
           "--customize-hook=: > \"$1/etc/resolv.conf\" && chmod 644 \"$1/etc/resolv.conf\"",
           "--customize-hook=printf '127.0.0.1 localhost\\n::1 localhost\\n' > \"$1/etc/hosts\"",
           "--customize-hook=rm -f \"$1/etc/hostname\" \"$1/etc/machine-id\"",
           *extra, suite, str(dest), *sources]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(_epoch())}
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=env, check=False)
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        raise BaseError(f"mmdebstrap failed (exit {p.returncode}) building {suite}:\n{tail}")


def build_debian_base(dest: Path, *, suite: str = DEBIAN_SUITE, mirror: str | None = None) -> None:
    mirror = mirror or debian_mirror()
    security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
    sources = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main",
               f"deb {security} {suite}-security main"]
    _mmdebstrap(dest, suite, sources, [])


def build_ubuntu_base(dest: Path, *, suite: str, mirror: str) -> None:
    keyring = Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg")
    if not keyring.is_file():
        raise BaseError("ubuntu-minimal needs Ubuntu's archive key",
                        hint="apt-get install -y ubuntu-keyring")
    sources = [f"deb {mirror} {suite} main universe",
               f"deb {mirror} {suite}-updates main universe"]
    _mmdebstrap(dest, suite, sources, [f"--keyring={keyring}"])
