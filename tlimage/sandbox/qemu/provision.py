"""Host provisioning for the microVM: a kernel and an initramfs, built from Debian packages.

Everything comes from apt (the only source this tool relies on): the versioned cloud kernel
package that `linux-image-cloud-amd64` points at, and `busybox-static`. The guest agent
(runner/agent.c) is compiled here with `gcc -static`. The result lives in

    <cache>/executor-v1/guest/<kernel release>-<key>/{vmlinuz, initrd.img, manifest.json}

where <key> hashes the package versions, the runner sources and the module list, so a new kernel,
busybox or agent gives a new folder and never a silent mix. Folders are published with a rename;
a finished folder is never modified.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tlimage import _layout
from tlimage._fs import write_atomic
from tlimage._private import private_dir
from tlimage.errors import ExecutorError

# Bump when the layout of the guest folder or the initramfs changes; the name carries it.
PROVISION_FORMAT = _layout.EXECUTOR.path
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# What the guest needs beyond the built-in drivers: virtio-mmio transport (microvm has no PCI),
# block, console (virtio-serial), net, rng and overlayfs. ext4 is built into Debian's kernel;
# if a kernel ships it as a module it is resolved like the rest. autofs4 and binfmt_misc:
# systemd (PID 1 in sandboxes of systemd images) wants them for its automount units and
# systemd-binfmt, and cannot load them itself: the image holds no modules of this kernel.
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "overlay",
    "ext4",
    "autofs4",
    "binfmt_misc",
)


class ProvisionError(ExecutorError):
    """The host lacks a tool, or apt could not provide a package."""


def cache_root() -> Path:
    """The tlimage cache folder: $TLIMAGE_CACHE_DIR, else $XDG_CACHE_HOME/tlimage, else
    ~/.cache/tlimage."""
    env = os.environ.get("TLIMAGE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tlimage"


def bucket_dir(bucket: _layout.Bucket, cache_dir: Path | None = None) -> Path:
    """Where a cache bucket of `tlimage._layout` is (its parent folder made)."""
    root = cache_dir or cache_root()
    private_dir(root)
    path = bucket.under(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# Tool -> the Debian package that provides it, for error messages.
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "gcc": "gcc libc6-dev",
    "qemu-system-x86_64": "qemu-system-x86",
    "mke2fs": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "unshare": "util-linux",
    "busybox": "busybox-static",
}


def require_tool(tool: str, why: str) -> str:
    """Returns the tool's path or raises naming the apt package that provides it."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = TOOL_PACKAGES.get(tool, tool)
        raise ProvisionError(
            f"`{tool}` is not installed; it is needed {why}",
            hint=f"install it with: apt-get install -y --no-install-recommends {pkg}",
        )
    return path


def runner_source_dir() -> Path:
    """runner/ sources: inside the installed package (wheel) or at the repository root."""
    here = Path(__file__).resolve().parents[2]  # tlimage/
    for candidate in (here / "_runner", here.parent / "runner"):
        if (candidate / "agent.c").is_file() and (candidate / "init").is_file():
            return candidate
    raise ProvisionError(
        "the guest runner sources (runner/agent.c, runner/init) are missing from this installation"
    )


@dataclass(frozen=True)
class GuestKit:
    """A provisioned kernel + initramfs pair; immutable once returned."""

    kernel: Path
    initrd: Path
    kernel_package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    kernel_version: str  # Debian version, e.g. 6.1.192-2
    kernel_release: str  # uname -r inside the guest
    busybox_version: str
    key: str

    @property
    def folder(self) -> Path:
        return self.kernel.parent


def _run(cmd: list[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ProvisionError(f"{what}: {e}") from None
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-8:])
        raise ProvisionError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    return p.stdout


def _apt_show(package: str) -> dict[str, str]:
    require_tool("apt-cache", "to look up Debian packages")
    p = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0 or not p.stdout.strip():
        raise ProvisionError(
            f"apt knows no package {package!r}",
            hint="run `apt-get update` (the package lists may be missing), and check that the "
            "Debian main archive is in /etc/apt/sources.list(.d)",
        )
    fields: dict[str, str] = {}
    key = None
    for line in p.stdout.splitlines():
        if not line.strip():
            break  # first stanza = candidate version
        if line[0].isspace() and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def resolve_packages() -> tuple[tuple[str, str], tuple[str, str]]:
    """((kernel package, version), (busybox package, version)) as apt would install them now."""
    meta = _apt_show(KERNEL_META_PACKAGE)
    m = re.match(r"\s*(linux-image-[^\s,(|]+)", meta.get("Depends", ""))
    if not m:
        raise ProvisionError(
            f"{KERNEL_META_PACKAGE} has no linux-image-* dependency: {meta.get('Depends')!r}"
        )
    kpkg = m.group(1)
    kver = _apt_show(kpkg)["Version"]
    bver = _apt_show(BUSYBOX_PACKAGE)["Version"]
    return (kpkg, kver), (BUSYBOX_PACKAGE, bver)


def _runner_digest(src: Path) -> str:
    h = hashlib.sha256()
    for name in ("agent.c", "init"):
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return h.hexdigest()


def provision(
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> GuestKit:
    """Returns the kernel and initramfs for the build microVM, building them on first use.

    Cost on a miss: two `apt-get download`s (~30 MB), one static compile, ~2 s. On a hit: a
    stat of apt's lists — which kit is current is remembered (`_remembered_kit`) until apt's
    package lists or configuration, or the runner sources, change; asking apt costs ~0.8 s per
    package on some hosts.
    """
    say = progress or (lambda _msg: None)
    memo_key = _memo_key(cache_dir)
    remembered = _remembered_kit(cache_dir, memo_key)
    if remembered is not None:
        return remembered
    kit = _provision(cache_dir, say)
    _remember_kit(cache_dir, memo_key, kit)
    return kit


def _memo_path(cache_dir: Path | None) -> Path:
    return bucket_dir(_layout.GUEST, cache_dir) / "current.json"


def _memo_key(cache_dir: Path | None) -> str:
    def mtime(path: str) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return 0

    return json.dumps(
        [
            PROVISION_FORMAT,
            _runner_digest(runner_source_dir()),
            GUEST_MODULES,
            *(
                mtime(p)
                for p in (
                    "/var/lib/apt/lists",
                    "/etc/apt",
                    "/etc/apt/sources.list.d",
                    "/etc/apt/preferences.d",
                )
            ),
        ]
    )


def _remembered_kit(cache_dir: Path | None, key: str) -> GuestKit | None:
    try:
        memo = json.loads(_memo_path(cache_dir).read_text())
        if memo.get("key") != key:
            return None
        folder = Path(memo["folder"])
        return _kit_from_manifest(folder, json.loads((folder / "manifest.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


def _remember_kit(cache_dir: Path | None, key: str, kit: GuestKit) -> None:
    path = _memo_path(cache_dir)
    try:
        write_atomic(path, json.dumps({"key": key, "folder": str(kit.folder)}), durable=False)
    except OSError:
        pass  # only a lost shortcut: the next start asks apt again


def _provision(cache_dir: Path | None, say: Callable[[str], None]) -> GuestKit:
    (kpkg, kver), (bpkg, bver) = resolve_packages()
    src = runner_source_dir()
    key_material = json.dumps(
        [PROVISION_FORMAT, kpkg, kver, bpkg, bver, _runner_digest(src), GUEST_MODULES]
    ).encode()
    key = hashlib.sha256(key_material).hexdigest()[:16]
    release = kpkg.removeprefix("linux-image-")
    guest_root = bucket_dir(_layout.GUEST, cache_dir)
    final = guest_root / f"{release}-{key}"
    manifest = final / "manifest.json"
    if manifest.is_file():
        return _kit_from_manifest(final, json.loads(manifest.read_text()))

    require_tool("apt-get", "to download the guest kernel and busybox")
    require_tool("dpkg-deb", "to unpack Debian packages")
    gcc = require_tool("gcc", "to compile the guest agent (runner/agent.c)")
    guest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".provision-", dir=guest_root) as tmp_s:
        tmp = Path(tmp_s)
        say(f"downloading {kpkg}={kver} and {bpkg}={bver} with apt")
        # Download as root without apt's sandbox user: the temp folder is ours alone.
        _run(
            [
                "apt-get",
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                f"{kpkg}={kver}",
                f"{bpkg}={bver}",
            ],
            cwd=tmp,
            what="apt-get download",
        )
        debs = sorted(tmp.glob("*.deb"))
        kdeb = next((d for d in debs if d.name.startswith(kpkg + "_")), None)
        bdeb = next((d for d in debs if d.name.startswith(bpkg + "_")), None)
        if kdeb is None or bdeb is None:
            raise ProvisionError(f"apt-get download produced {[d.name for d in debs]}")
        kroot, broot = tmp / "kernel", tmp / "busybox"
        _run(["dpkg-deb", "-x", str(kdeb), str(kroot)], what="dpkg-deb -x (kernel)")
        _run(["dpkg-deb", "-x", str(bdeb), str(broot)], what="dpkg-deb -x (busybox)")

        vmlinuz = next(iter(sorted((kroot / "boot").glob("vmlinuz-*"))), None)
        if vmlinuz is None:
            raise ProvisionError(f"{kdeb.name} contains no /boot/vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = kroot / "lib" / "modules" / release
        modules = resolve_modules(moddir, GUEST_MODULES)
        busybox = broot / "bin" / "busybox"
        if not busybox.is_file():
            raise ProvisionError(f"{bdeb.name} contains no /bin/busybox")

        say("compiling the guest agent")
        agent = tmp / "agent"
        _run(
            [gcc, "-static", "-Os", "-s", "-o", str(agent), str(src / "agent.c")],
            what="compiling runner/agent.c (needs gcc and libc6-dev)",
        )

        out = tmp / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        initrd = build_initramfs(
            busybox=busybox.read_bytes(),
            init=(src / "init").read_bytes(),
            agent=agent.read_bytes(),
            modules=[(name, path.read_bytes()) for name, path in modules],
        )
        (out / "initrd.img").write_bytes(initrd)
        meta = {
            "format": PROVISION_FORMAT,
            "key": key,
            "kernel_package": kpkg,
            "kernel_version": kver,
            "kernel_release": release,
            "busybox_version": bver,
            "modules": [name for name, _ in modules],
        }
        (out / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
        final = guest_root / f"{release}-{key}"
        try:
            os.replace(out, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # lost a race only if the winner finished
                raise
        say(f"guest kernel {release} and initramfs ready")
    return _kit_from_manifest(final, json.loads((final / "manifest.json").read_text()))


def _kit_from_manifest(folder: Path, meta: dict) -> GuestKit:
    return GuestKit(
        kernel=folder / "vmlinuz",
        initrd=folder / "initrd.img",
        kernel_package=meta["kernel_package"],
        kernel_version=meta["kernel_version"],
        kernel_release=meta["kernel_release"],
        busybox_version=meta["busybox_version"],
        key=meta["key"],
    )


# --- kernel modules --------------------------------------------------------------------------


def _modname(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _module_depends(ko: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (what depmod reads)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m:
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The wanted modules plus their dependencies, in load order. Built-in ones are skipped.
    Compressed modules (.ko.xz/.ko.zst) are not supported: Debian 12 ships plain .ko files."""
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        if p.name.endswith(".ko"):
            index[_modname(p)] = p
        else:
            index.setdefault(_modname(p), p)
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        builtin = {_modname(Path(line.strip())) for line in bfile.read_text().splitlines() if line}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        path = index.get(name)
        if path is None:
            raise ProvisionError(
                f"kernel module {name!r} (needed by {' <- '.join(chain) or 'the guest'}) "
                f"is neither built in nor shipped in {moddir}"
            )
        if not path.name.endswith(".ko"):
            raise ProvisionError(f"compressed kernel modules are not supported: {path.name}")
        seen.add(name)
        for dep in _module_depends(path.read_bytes()):
            visit(dep, (name, *chain))
        order.append((name, path))

    for name in wanted:
        visit(name, ())
    return order


# --- initramfs (cpio newc, gzip) -------------------------------------------------------------


def _cpio_entry(
    name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(
    *, busybox: bytes, init: bytes, agent: bytes, modules: list[tuple[str, bytes]]
) -> bytes:
    """A deterministic newc archive (fixed owners and times), gzip-compressed.

    Layout: /init (runner/init), /bin/busybox, /tl/agent, /lib/modules/<name>.ko and
    /tl/modules (load order, one name per line)."""
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tl", "tmp", "mnt"):
        entries.append((d, 0o040755, b""))
    entries.append(("init", 0o100755, init))
    entries.append(("bin/busybox", 0o100755, busybox))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("tl/agent", 0o100755, agent))
    entries.append(("tl/modules", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode()))
    for name, data in modules:
        entries.append((f"lib/modules/{name}.ko", 0o100644, data))
    raw = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        raw.write(_cpio_entry(name, mode, data, ino))
    # init's stdio before devtmpfs is mounted
    raw.write(_cpio_entry("dev/console", 0o020600, b"", len(entries) + 1, rdev=(5, 1)))
    raw.write(_cpio_entry("TRAILER!!!", 0))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
