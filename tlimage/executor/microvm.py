"""MicroVM executor: each step runs in a throwaway QEMU `-M microvm` guest.

    host                                        guest (runner/init, runner/agent.c)
    lower dirs --mke2fs -d--> ext4 images  -->  /dev/vdX (serial tl-l<N>), mounted ro
    sparse ext4 scratch image              -->  /dev/vdY (serial tl-scratch): uppers, work dirs
    unix socket <---- virtio-serial "tl.ctl" ---> agent: MOUNT, RUN (streams), EXPORT (tar), ...
    QMP unix socket                             (quit, query-kvm)

Acceleration: KVM only when a real boot probe reaches the agent within a short timeout (the
result is cached per host, QEMU and guest kit); otherwise TCG. Some hosts expose a /dev/kvm that
cannot run a stock guest kernel, so the presence of /dev/kvm proves nothing.

Lower images are cached in `<cache>/executor-v1/ext4/<tree key>.img`, keyed by the tree's
metadata (paths, modes, owners, sizes, mtimes, link targets, xattrs): lowers are immutable by
contract, so a changed file must change its size or mtime. More than MAX_LOWER_DISKS lowers are
flattened, bottom ones first, into one image.

RUN mounts (`RunRequest.mounts`) travel as extra disks and agent requests (protocol v3, BIND):
a host folder or file becomes an ext4 image made for the step; a view of layers becomes one
image (cached like the lowers when its layers are store layers, `HostMount.stable`) under an
overlay on the scratch disk, so writes to it are discarded; tmpfs and secrets are made by the
agent (a secret's bytes go over the channel onto a guest tmpfs, never onto a disk). A writable
host folder (a cache mount) is mounted through an overlay too; after the step its upper is
exported and applied to the folder, so writes persist as with the namespace sandbox. A step
with mounts boots a VM with its disks; the VM then stays warm for later steps.

Warm VM: after a step, the VM stays up (unless `keep_warm=False`). When every lower of the next
request is either one of this VM's disks (same host path) or an upper this VM produced (same
content, see `content_key`: the builder passes uppers back as unpacked store layers), the step
runs in the same VM, stacking the uppers from the scratch disk, and skips a boot. Any other request, any error, a timeout or `close()`
ends the VM. A VM never outlives this process: QEMU gets PR_SET_PDEATHSIG, and `close` runs at
exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tlimage.errors import ExecutorError
from tlimage.executor import protocol as P
from tlimage.executor.base import (
    OPAQUE_XATTR,
    HostMount,
    OutputCallback,
    RunRequest,
    RunResult,
    StepTimeout,
    normalize_upper,
)
from tlimage.executor.provision import GuestKit, executor_dir, provision, require_tool

# 24 virtio-mmio transports in QEMU's microvm; scratch, serial, net and rng take 4.
MAX_DISKS = 20
MAX_LOWER_DISKS = 16
# Part of every cached image's name: bump when make_ext4's output changes for the same tree.
IMAGE_FORMAT = "i2"
DEFAULT_MEMORY_MB = 2048
DEFAULT_SCRATCH = 64 << 30  # sparse: costs only what the steps write
TCG_BOOT_TIMEOUT = 120.0
KVM_BOOT_TIMEOUT = 30.0
KVM_PROBE_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


class BootError(ExecutorError):
    """QEMU exited or the guest agent did not answer in time."""


def _die_with_parent() -> None:  # child side of fork, before exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def host_tsc_khz() -> int | None:
    """The host TSC frequency, passed as tsc_early_khz= so the guest skips (and under TCG
    sometimes hangs in) TSC calibration."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


# --- lower images ----------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below root (root itself as "."), parents before children, names sorted."""
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        st = os.lstat(path)
        yield rel or ".", st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), reverse=True)
            stack.extend(os.path.join(rel, n) if rel else n for n in names)


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        with contextlib.suppress(OSError):
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
    return out


def tree_key(root: Path) -> tuple[str, int, int]:
    """(metadata digest, bytes of file data, number of entries) of a directory tree."""
    import xxhash

    h = xxhash.xxh3_128()
    size = count = 0
    for rel, st in _walk(root):
        path = os.path.join(root, rel)
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        rec = (rel, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev,
               link, [(n, v.hex()) for n, v in _xattrs(path)])
        h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
        if stat.S_ISREG(st.st_mode):
            size += (st.st_size + 4095) // 4096 * 4096
        count += 1
    return h.hexdigest(), size, count


def make_ext4(src: Path, dest: Path, data_bytes: int, entries: int, *,
              root_owner: tuple[int, int] = (0, 0),
              root_mode: int | None = None) -> None:  # fmt: skip
    """mke2fs -d: copies modes, owners, times, hard links, devices (whiteouts) and xattrs
    (the opaque marker). No journal: the image is only ever mounted read-only."""
    mke2fs = require_tool("mke2fs", "to build the base disk images for the microVM")
    size = max(64 << 20, data_bytes * 2 + entries * 8192 + (32 << 20))
    for _attempt in range(3):
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        with open(dest, "wb") as f:
            f.truncate(size)
        p = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
             "-N", str(entries + 256), "-O", "^has_journal,^resize_inode",
             "-E", f"root_owner={root_owner[0]}:{root_owner[1]}", "-L", "tl-lower", "-d",
             str(src), str(dest)],
            capture_output=True, text=True, check=False,
        )
        if p.returncode == 0:
            if not (src / "lost+found").exists():
                _drop_lost_found(dest)
            if root_mode is not None and root_mode != 0o755:  # mke2fs -d leaves the root 0755
                _debugfs(dest, f"sif / mode 0{stat.S_IFDIR | root_mode:o}")
            return
        if "No space left" not in p.stderr and "Could not allocate" not in p.stderr:
            break
        size *= 2
    raise ExecutorError(f"mke2fs -d {src} failed: {p.stderr.strip()[-500:]}")


def _drop_lost_found(image: Path) -> None:
    """mke2fs always makes /lost+found; a step must see the layers' root, nothing more."""
    _debugfs(image, "rmdir /lost+found")


def _debugfs(image: Path, request: str) -> None:
    debugfs = require_tool("debugfs", "to edit the base disk images for the microVM")
    p = subprocess.run([debugfs, "-w", "-R", request, str(image)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise ExecutorError(f"debugfs {request} {image} failed: {p.stderr.strip()}")


def flatten_layers(lowers: list[Path], dest: Path) -> None:
    """Applies overlay-style layers bottom to top onto `dest` (whiteouts delete, opaque dirs
    replace). Regular files are hard-linked from the layers when possible: the result is read
    by mke2fs only and then deleted, never modified."""
    dest.mkdir(parents=True, exist_ok=True)
    for layer in lowers:
        for rel, st in _walk(layer):
            src = os.path.join(layer, rel)
            dst = os.path.normpath(os.path.join(dest, rel))
            mode = st.st_mode
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                _remove(dst)
                continue
            if stat.S_ISDIR(mode):
                opaque = False
                with contextlib.suppress(OSError):
                    opaque = os.getxattr(src, OPAQUE_XATTR, follow_symlinks=False) == b"y"
                if os.path.lexists(dst) and (opaque or not os.path.isdir(dst)
                                             or os.path.islink(dst)):
                    if rel != ".":
                        _remove(dst)
                    elif opaque:
                        for n in os.listdir(dst):
                            _remove(os.path.join(dst, n))
                if not os.path.lexists(dst):
                    os.mkdir(dst)
                os.chown(dst, st.st_uid, st.st_gid)
                os.chmod(dst, stat.S_IMODE(mode))
                for n, v in _xattrs(src):
                    if not n.startswith("trusted.overlay."):
                        os.setxattr(dst, n, v, follow_symlinks=False)
                continue
            _remove(dst)
            if stat.S_ISREG(mode):
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
                    os.chown(dst, st.st_uid, st.st_gid)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(src), dst)
                os.lchown(dst, st.st_uid, st.st_gid)
            else:
                os.mknod(dst, mode, st.st_rdev)
                os.chown(dst, st.st_uid, st.st_gid)
    # Directory times last: creating children changed them.
    for layer in lowers:
        for rel, st in _walk(layer):
            dst = os.path.join(dest, rel)
            if stat.S_ISDIR(st.st_mode) and os.path.isdir(dst):
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def lower_images(lowers: tuple[Path, ...], cache_dir: Path | None = None, *,
                 max_disks: int = MAX_LOWER_DISKS) -> list[Path]:  # fmt: skip
    """One cached ext4 image per lower (bottom first); excess bottom lowers are flattened."""
    root = executor_dir(cache_dir) / "ext4"
    root.mkdir(parents=True, exist_ok=True)
    groups: list[list[Path]] = [[p] for p in lowers]
    if len(groups) > max_disks:
        cut = len(groups) - max_disks + 1
        groups = [[p for g in groups[:cut] for p in g], *groups[cut:]]
    images = []
    for group in groups:
        keys = [tree_key(p) for p in group]
        name = keys[0][0] if len(group) == 1 else "flat-" + _digest([k[0] for k in keys])
        name = f"{IMAGE_FORMAT}-{name}"
        img = root / f"{name}.img"
        if not img.exists():
            tmp = root / f".{name}.{os.getpid()}.tmp"
            with tempfile.TemporaryDirectory(prefix=".flat-", dir=root) as flat:
                src = group[0]
                if len(group) > 1:
                    src = Path(flat) / "tree"
                    flatten_layers(group, src)
                make_ext4(src, tmp, sum(k[1] for k in keys), sum(k[2] for k in keys))
            os.replace(tmp, img)
        images.append(img)
    return images


def _digest(parts: list[str]) -> str:
    import xxhash

    return xxhash.xxh3_128("\n".join(parts).encode()).hexdigest()


def make_scratch(path: Path, size: int = DEFAULT_SCRATCH) -> None:
    mke2fs = require_tool("mke2fs", "to make the microVM's scratch disk")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", "tl-scratch",
         "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)],
        check=True, capture_output=True,
    )


# --- the VM ----------------------------------------------------------------------------------


class _Channel:
    """Frames over the virtio-serial unix socket, with deadlines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, frame: P.Frame) -> None:
        self.sock.settimeout(30)
        self.sock.sendall(P.encode_frame(frame))

    def _fill(self, n: int, deadline: float | None) -> None:
        while len(self.buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError:
                raise
            except OSError as e:  # QEMU died: connection reset
                raise EOFError(f"the guest channel failed: {e}") from None
            if not chunk:
                raise EOFError("the guest closed the channel")
            self.buf += chunk

    def recv(self, deadline: float | None = None) -> P.Frame:
        self._fill(P.HEADER.size, deadline)
        t, length = P.decode_header(bytes(self.buf[: P.HEADER.size]))
        self._fill(P.HEADER.size + length, deadline)
        payload = bytes(self.buf[P.HEADER.size : P.HEADER.size + length])
        del self.buf[: P.HEADER.size + length]
        return P.Frame(t, payload)


class QMP:
    """A QMP client that skips events. With a `deadline` (time.monotonic()) it waits for the
    monitor socket to open and for each reply as long as the deadline allows; without one the
    socket must be open now and replies get 5 s. Failures are raised as `error`."""

    error: type[Exception] = ExecutorError

    def __init__(self, path: str | Path, deadline: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if deadline is None:
                    raise
                if time.monotonic() > deadline:
                    raise self.error(f"QEMU's monitor socket {path} did not open") from None
                time.sleep(0.005)
        self.sock.settimeout(5 if deadline is None else max(1.0, deadline - time.monotonic()))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QEMU closed its monitor")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name: str, **args) -> dict:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise self.error(f"QMP {name}: {reply['error'].get('desc')}")
        return reply.get("return", {})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class _VM:
    kit: GuestKit
    accel: str  # "kvm" | "tcg"
    disks: list[Path]
    network: bool
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = 0  # 0: min(2, host cores)
    scratch_size: int = DEFAULT_SCRATCH
    tmp: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)
    chan: _Channel | None = field(default=None, init=False)
    qmp: QMP | None = field(default=None, init=False)
    boot_seconds: float = field(default=0.0, init=False)

    def command_line(self) -> list[str]:
        qemu = require_tool("qemu-system-x86_64", "to run build steps in a microVM")
        cpus = self.cpus or min(2, os.cpu_count() or 1)
        append = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "rdinit=/init",
                  f"tl.epoch={int(time.time())}"]
        khz = host_tsc_khz()
        if khz and self.accel == "tcg":
            append.append(f"tsc_early_khz={khz}")
        if self.network:
            append.append("tl.net=1")
        cmd = [qemu, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
               "-m", str(self.memory_mb), "-smp", str(cpus),
               "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
               "-kernel", str(self.kit.kernel), "-initrd", str(self.kit.initrd),
               "-append", " ".join(append),
               "-chardev", f"file,id=con,path={self.tmp / 'console.log'}",
               "-serial", "chardev:con",
               "-qmp", f"unix:{self.tmp / 'qmp.sock'},server=on,wait=off",
               "-device", "virtio-serial-device",
               "-chardev", f"socket,id=ctl,path={self.tmp / 'ctl.sock'},server=on,wait=off",
               "-device", "virtserialport,chardev=ctl,name=tl.ctl",
               "-object", "rng-random,id=rng0,filename=/dev/urandom",
               "-device", "virtio-rng-device,rng=rng0"]
        if self.accel == "kvm":
            cmd += ["-accel", "kvm", "-cpu", "host"]
        else:
            cmd += ["-accel", "tcg,thread=multi", "-cpu", "max"]
        for i, disk in enumerate(self.disks):
            cmd += ["-drive", f"id=l{i},file={disk},format=raw,if=none,readonly=on",
                    "-device", f"virtio-blk-device,drive=l{i},serial=tl-l{i}"]
        cmd += ["-drive", f"id=scratch,file={self.tmp / 'scratch.img'},format=raw,if=none,"
                "cache=unsafe,discard=unmap",
                "-device", "virtio-blk-device,drive=scratch,serial=tl-scratch"]
        if self.network:
            cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
        return cmd

    def start(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tl-vm-"))  # short: unix socket paths <108
        try:
            make_scratch(self.tmp / "scratch.img", self.scratch_size)
            log = open(self.tmp / "qemu.log", "wb")
            try:
                self.proc = subprocess.Popen(
                    self.command_line(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            deadline = t0 + timeout
            sock = socket.socket(socket.AF_UNIX)
            while True:
                if self.proc.poll() is not None:
                    raise self._boot_error("QEMU exited during start-up")
                try:
                    sock.connect(str(self.tmp / "ctl.sock"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise self._boot_error("QEMU did not open its channel socket") from None
                    time.sleep(0.005)
            self.chan = _Channel(sock)
            with contextlib.suppress(OSError, EOFError, ExecutorError):
                self.qmp = QMP(self.tmp / "qmp.sock")
            try:
                hello = self.chan.recv(deadline)
            except TimeoutError:
                raise self._boot_error(f"the guest agent did not answer within {timeout:g} s") \
                    from None
            except EOFError:
                raise self._boot_error("the guest closed the channel during boot") from None
            P.decode_hello(hello)
            self.boot_seconds = time.monotonic() - t0
        except BaseException:
            self.kill()
            raise

    def _boot_error(self, what: str) -> BootError:
        tail = []
        for name in ("qemu.log", "console.log"):
            with contextlib.suppress(OSError):
                tail += (self.tmp / name).read_text(errors="replace").strip().splitlines()[-12:]
        detail = "\n".join("  | " + line for line in tail)
        return BootError(f"microVM ({self.accel}) failed to boot: {what}"
                         + (f"\n{detail}" if detail else ""))

    def request(self, frame: P.Frame, deadline: float | None = None) -> P.Frame:
        """Sends a request that answers with one OK/ERROR frame."""
        assert self.chan is not None
        self.chan.send(frame)
        reply = self.chan.recv(deadline)
        if reply.type is P.FrameType.ERROR:
            raise ExecutorError(f"guest agent: {P.decode_error(reply)}")
        if reply.type is not P.FrameType.OK:
            raise P.ProtocolError(f"expected OK, got {reply.type.name}")
        return reply

    def shutdown(self) -> None:
        """Graceful when possible (the agent syncs and resets), then QMP quit, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.send(P.encode_shutdown())
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.command("quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(1)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for c in (self.chan and self.chan.sock, self.qmp):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self.chan = self.qmp = None
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- KVM probe -------------------------------------------------------------------------------


def _qemu_version() -> str:
    qemu = require_tool("qemu-system-x86_64", "to run build steps in a microVM")
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def probe_kvm(kit: GuestKit, cache_dir: Path | None = None, *,
              timeout: float = KVM_PROBE_TIMEOUT, refresh: bool = False) -> tuple[bool, str]:
    """(usable, reason). Boots the real guest with -accel kvm; usable only if the agent answers
    within `timeout` and QMP confirms KVM is on. Cached in executor-v1/kvm-probe.json keyed by
    the host kernel, QEMU version and guest kit. `TLIMAGE_KVM=0|1` overrides without probing."""
    forced = os.environ.get("TLIMAGE_KVM")
    if forced in ("0", "1"):
        return forced == "1", f"TLIMAGE_KVM={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    key = f"{os.uname().release}|{_qemu_version()}|{kit.key}"
    path = executor_dir(cache_dir) / "kvm-probe.json"
    cache: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if not refresh and key in cache:
        entry = cache[key]
        return bool(entry["usable"]), entry["reason"] + " (cached)"
    vm = _VM(kit, "kvm", [], network=False, memory_mb=256, cpus=1, scratch_size=64 << 20)
    t0 = time.monotonic()
    try:
        vm.start(timeout)
        enabled = vm.qmp.command("query-kvm").get("enabled", False) if vm.qmp else True
        usable = bool(enabled)
        reason = (f"booted with KVM in {time.monotonic() - t0:.2f} s" if usable
                  else "QEMU reports KVM not enabled")
    except BootError as e:
        usable, reason = False, str(e).splitlines()[0] + "; " + " / ".join(
            line.strip(" |") for line in str(e).splitlines()[1:3])
    finally:
        vm.shutdown()
    cache[key] = {"usable": usable, "reason": reason, "at": int(time.time())}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=2) + "\n")
    os.replace(tmp, path)
    return usable, reason


# --- upper export ----------------------------------------------------------------------------


class _TarFrames(io.RawIOBase):
    """A readable stream over TAR frames; stops at the first other frame, kept in `end`."""

    def __init__(self, chan: _Channel, deadline: float | None) -> None:
        self.chan, self.deadline = chan, deadline
        self.pending = b""
        self.end: P.Frame | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending and self.end is None:
            f = self.chan.recv(self.deadline)
            if f.type is P.FrameType.TAR:
                self.pending = f.payload
            else:
                self.end = f
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def unpack_export(stream: io.RawIOBase, dest: Path) -> None:
    """Extracts the agent's tar into `dest` as an overlay-style upper: owners, modes, mtimes and
    devices (whiteouts included) are kept; a hard link to a whiteout becomes a fresh 0:0 device.
    The guest is untrusted: `tlimage._fs.Extractor` keeps every entry and link inside `dest`."""
    from tlimage._fs import extract_tar

    extract_tar(io.BufferedReader(stream, 1 << 20), dest, mode="r|", same_owner=True,
                root_entry=True, follow_links=False, error=ExecutorError)  # fmt: skip


# --- the executor ----------------------------------------------------------------------------

_live: weakref.WeakSet[MicroVMExecutor] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for ex in list(_live):
        with contextlib.suppress(Exception):
            ex.close()


def content_key(root: Path) -> str:
    """What a layer says, not when it was written: paths, types, modes, owners, devices, link
    targets, file bytes, xattrs that layers keep, and the opaque marker; no times. An upper and
    the same upper after a trip through the layer store have the same key."""
    import xxhash

    h = xxhash.xxh3_128()
    for rel, st in _walk(root):
        path = os.path.join(root, rel)
        mode = st.st_mode
        rec: list = [rel, stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_uid, st.st_gid]
        if stat.S_ISLNK(mode):
            rec.append(os.readlink(path))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rec.append(st.st_rdev)
        elif stat.S_ISREG(mode):
            fh = xxhash.xxh3_128()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    fh.update(chunk)
            rec.append(fh.hexdigest())
        rec.append([(n, v.hex()) for n, v in _xattrs(path)
                    if n == OPAQUE_XATTR or n.startswith(("user.", "security.capability"))])
        h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


@dataclass
class _Session:
    """A running VM and what it can serve as lowers without a reboot: its disks (by host path)
    and the uppers of the steps it ran (on the scratch disk, by content key)."""

    vm: _VM
    disks: dict[Path, str]  # resolved host lower -> guest mount point
    network: bool
    uppers: dict[str, str] = field(default_factory=dict)  # content key -> guest upper
    steps: int = 0
    _keys: dict[Path, str] = field(default_factory=dict)

    def guest_lowers(self, lowers: tuple[Path, ...]) -> list[str] | None:
        """Guest paths for `lowers` (bottom first), or None if one is not available here."""
        out = []
        for lower in lowers:
            real = lower.resolve()
            if real in self.disks:
                out.append(self.disks[real])
                continue
            if not self.uppers:
                return None
            key = self._keys.get(real)
            if key is None:
                key = self._keys[real] = content_key(real)
            if key not in self.uppers:
                return None
            out.append(self.uppers[key])
        return out


class MicroVMExecutor:
    name = "microvm"

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        accel: str = "auto",
        memory_mb: int = DEFAULT_MEMORY_MB,
        cpus: int = 0,
        keep_warm: bool = True,
        boot_timeout: float | None = None,
        progress=None,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ExecutorError(f"unknown acceleration {accel!r}; expected auto, kvm or tcg")
        require_tool("qemu-system-x86_64", "to run build steps in a microVM")
        self.cache_dir = cache_dir
        self.kit = provision(cache_dir, progress=progress)
        if accel == "auto":
            usable, self.accel_reason = probe_kvm(self.kit, cache_dir)
            accel = "kvm" if usable else "tcg"
        else:
            self.accel_reason = "requested"
        self.accel = accel
        self.memory_mb, self.cpus, self.keep_warm = memory_mb, cpus, keep_warm
        self.boot_timeout = boot_timeout or (KVM_BOOT_TIMEOUT if accel == "kvm"
                                             else TCG_BOOT_TIMEOUT)
        self._session: _Session | None = None
        self.last_boot_seconds: float | None = None
        self.boots = 0  # VMs started by this executor (the warm VM saves boots)
        _live.add(self)

    def run(self, req: RunRequest, on_output: OutputCallback | None = None) -> RunResult:
        start = time.monotonic()
        emit = on_output or (lambda _s, _b: None)
        if req.upper_dir.exists():
            raise ExecutorError(f"upper dir already exists: {req.upper_dir}")
        for lower in req.lowers:
            if not lower.is_dir():
                raise ExecutorError(f"lower layer is not a directory: {lower}")
        ok = False
        work = (Path(tempfile.mkdtemp(prefix=".tl-vm-mounts-", dir=req.upper_dir.parent))
                if req.mounts else None)  # fmt: skip
        try:
            images: list[tuple[HostMount, Path | tuple[str, ...] | None, str]] = []
            if work is not None:
                images = self._warm_mounts(req) or self._mount_images(req, work)  # type: ignore[assignment]
            session, guest_lowers, first = self._session_for(
                req, [img for _, img, _ in images if isinstance(img, Path)])
            vm = session.vm
            i = session.steps
            session.steps += 1
            upper = f"/tl/scratch/{i}/upper"
            plan = _plan_mounts(req, images, first, f"/tl/scratch/{i}")
            for overlay in plan.overlays:  # before the root: RUN runs in the last MOUNT's target
                vm.request(P.encode_mount(overlay))
            vm.request(P.encode_mount(P.MountRequest(
                tuple(guest_lowers), upper, f"/tl/scratch/{i}/work", "/tl/root")))
            try:
                for bind in plan.binds:
                    vm.request(P.encode_bind(bind))
            except ExecutorError as e:
                raise ExecutorError(f"step could not start: RUN --mount: "
                                    f"{str(e).removeprefix('guest agent: BIND: ')}") from None
            code = self._run_step(vm, req, emit, plan.env)
            if req.mounts:
                vm.request(P.encode_unbind())
            req.upper_dir.mkdir()
            opaque = self._export(vm, upper, req)
            for j, (guest_upper, dest) in enumerate(plan.writeback):
                assert work is not None
                self._write_back(vm, guest_upper, dest, work / f"writeback{j}")
            for overlay in plan.overlays:
                vm.request(P.encode_umount(overlay.target))
            vm.request(P.encode_umount("/tl/root"))
            if self.keep_warm:
                session.uppers[content_key(req.upper_dir)] = upper
            ok = True
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            if not ok:
                self._end_session()
                shutil.rmtree(req.upper_dir, ignore_errors=True)
        if not self.keep_warm:
            self._end_session()
        return RunResult(code, req.upper_dir, time.monotonic() - start, opaque)

    def _session_for(self, req: RunRequest,
                     extra: list[Path] | None = None) -> tuple[_Session, list[str], int]:  # fmt: skip
        """The session to run `req` in, the guest paths of its lowers, and the index of the
        first of the `extra` disks (mount images), which always need a fresh VM."""
        s = self._session
        if (not extra and s is not None and s.vm.proc is not None and s.vm.proc.poll() is None
                and s.network == req.network):
            guest = s.guest_lowers(req.lowers)
            if guest is not None:
                return s, guest, -1
        self._end_session()
        extra = extra or []
        budget = min(MAX_LOWER_DISKS, MAX_DISKS - len(extra))
        if budget < 1:
            raise ExecutorError(f"a step may mount at most {MAX_DISKS - 1} folders, files or "
                                f"views in a microVM; this one mounts {len(extra)}")  # fmt: skip
        disks = lower_images(req.lowers, self.cache_dir, max_disks=budget)
        vm = _VM(self.kit, self.accel, [*disks, *extra], req.network, self.memory_mb, self.cpus)
        vm.start(self.boot_timeout)
        self.boots += 1
        self.last_boot_seconds = vm.boot_seconds
        mapping: dict[Path, str] = {}
        guest = []
        # One disk per lower, except that lower_images may flatten the bottom ones into one.
        flat = len(req.lowers) - len(disks) + 1
        for j, lower in enumerate(req.lowers):
            d = max(0, j - flat + 1)
            guest.append(f"/tl/lower/{d}")
            if flat == 1:
                mapping[lower.resolve()] = f"/tl/lower/{d}"
        self._session = _Session(vm, mapping, req.network)
        return self._session, list(dict.fromkeys(guest)), len(disks)

    def _run_step(self, vm: _VM, req: RunRequest, emit: OutputCallback,
                  secret_env: tuple[bytes, ...] = ()) -> int:  # fmt: skip
        assert vm.chan is not None
        deadline = None if req.timeout is None else time.monotonic() + req.timeout
        env = (*req.env_list(), *secret_env)  # the channel is private: no log, no argv
        vm.chan.send(P.encode_run(P.RunRequestMsg(
            req.argv, env, req.user, req.workdir, req.network)))  # type: ignore[arg-type]
        while True:
            try:
                f = vm.chan.recv(deadline)
            except TimeoutError:
                raise StepTimeout(
                    f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}"
                ) from None
            except EOFError:
                raise ExecutorError(
                    "the microVM died during the step" + _console_tail(vm)) from None
            if f.type is P.FrameType.STDOUT:
                emit("stdout", f.payload)
            elif f.type is P.FrameType.STDERR:
                emit("stderr", f.payload)
            elif f.type is P.FrameType.EXIT:
                return P.decode_exit(f).code
            elif f.type is P.FrameType.ERROR:
                raise ExecutorError(f"step could not start: {P.decode_error(f)}")
            else:
                raise P.ProtocolError(f"unexpected {f.type.name} frame during RUN")

    def _export(self, vm: _VM, guest_upper: str, req: RunRequest) -> tuple[str, ...]:
        self._export_to(vm, guest_upper, req.upper_dir)
        return normalize_upper(req.upper_dir, req.lowers)

    def _export_to(self, vm: _VM, guest_upper: str, dest: Path) -> None:
        assert vm.chan is not None
        vm.chan.send(P.encode_export(guest_upper))
        stream = _TarFrames(vm.chan, time.monotonic() + 600)
        unpack_export(stream, dest)
        while stream.end is None:  # tar's end-of-archive padding may leave frames unread
            stream.read(65536)
        end = stream.end
        if end.type is P.FrameType.ERROR:
            raise ExecutorError(f"exporting the step's changes failed: {P.decode_error(end)}")
        if end.type is not P.FrameType.EXPORT_END:
            raise P.ProtocolError(f"unexpected {end.type.name} frame during EXPORT")
        meta = P.decode_export_end(end)
        from tlimage._fs import UnsafePathError, setxattr_in_root

        try:
            for rel, name, value in meta.xattrs:
                setxattr_in_root(dest, rel, name, value)
            for rel in meta.opaque:
                setxattr_in_root(dest, rel, OPAQUE_XATTR, b"y")
        except (UnsafePathError, FileNotFoundError) as e:
            raise ExecutorError(f"guest export: unsafe xattr path: {e}") from None

    def _write_back(self, vm: _VM, guest_upper: str, dest: Path, scratch: Path) -> None:
        """A writable host folder's changes, made in the guest on an overlay over its image,
        applied to the folder itself."""
        scratch.mkdir()
        self._export_to(vm, guest_upper, scratch)
        apply_upper(scratch, dest)

    def _warm_mounts(self, req: RunRequest) -> list | None:
        """`_mount_images` without new disks, when the warm VM can serve the step and every one
        of its mounts: tmpfs, secrets, and views of layers the VM already has (a stage built
        earlier in the same VM: its lowers are disks, its uppers on the scratch disk)."""
        s = self._session
        if (s is None or s.vm.proc is None or s.vm.proc.poll() is not None
                or s.network != req.network or s.guest_lowers(req.lowers) is None):
            return None
        out: list[tuple[HostMount, tuple[str, ...] | None, str]] = []
        for m in req.sorted_mounts():
            if m.kind in ("tmpfs", "secret"):
                out.append((m, None, ""))
            elif m.kind == "view" and m.stable and (g := s.guest_lowers(m.layers)) is not None:
                out.append((m, tuple(g), m.subpath))
            else:
                return None
        return out

    def _mount_images(self, req: RunRequest,
                      work: Path) -> list[tuple[HostMount, Path | None, str]]:  # fmt: skip
        """Per file mount (parents first): the mount, the disk image that carries it (None for
        tmpfs and secrets) and the path inside that image to mount ("/" for its root)."""
        out: list[tuple[HostMount, Path | None, str]] = []
        for j, m in enumerate(req.sorted_mounts()):
            if m.kind in ("tmpfs", "secret"):
                out.append((m, None, ""))
            elif m.kind == "bind":
                assert m.source is not None
                if not os.path.lexists(m.source):
                    raise ExecutorError(f"mount source for {m.target} does not exist: "
                                        f"{m.source}")  # fmt: skip
                src, name = m.source, "/"
                if not m.source.is_dir():
                    if not m.readonly:
                        raise ExecutorError(f"a writable bind of a single file ({m.source}) is "
                                            "not supported in a microVM")  # fmt: skip
                    src, name = work / f"file{j}", "f"
                    src.mkdir()
                    shutil.copy2(m.source, src / name)
                img = work / f"bind{j}.img"
                _, size, count = tree_key(src)
                top = os.stat(src)  # a cache mount's root keeps its owner and mode (uid=, mode=)
                make_ext4(src, img, size, count, root_owner=(top.st_uid, top.st_gid),
                          root_mode=stat.S_IMODE(top.st_mode))  # fmt: skip
                out.append((m, img, name))
            else:
                if m.stable:
                    (img,) = lower_images(m.layers, self.cache_dir, max_disks=1)
                else:
                    flat = work / f"view{j}"
                    flatten_layers(list(m.layers), flat)
                    img = work / f"view{j}.img"
                    _, size, count = tree_key(flat)
                    make_ext4(flat, img, size, count)
                out.append((m, img, m.subpath))
        return out

    def _end_session(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            s.vm.shutdown()

    def close(self) -> None:
        self._end_session()
        _live.discard(self)


@dataclass
class _MountPlan:
    overlays: list[P.MountRequest] = field(default_factory=list)  # MOUNTed before the BINDs
    binds: list[P.BindMsg] = field(default_factory=list)
    env: tuple[bytes, ...] = ()  # secrets exposed as variables, `KEY=VALUE`
    writeback: list[tuple[str, Path]] = field(default_factory=list)  # guest upper -> host folder


def _plan_mounts(req: RunRequest, images: list, first: int, step_dir: str) -> _MountPlan:
    """The agent requests for a step's mounts. `images` holds per file mount (parents first)
    the mount, what carries it (an image, the k-th being guest disk /tl/lower/<first+k>; guest
    lowers the VM already has; None for tmpfs and secrets) and the path to mount inside it."""
    plan = _MountPlan()
    k = 0
    for j, (m, img, name) in enumerate(images):
        lowers: tuple[str, ...] = ()
        if isinstance(img, tuple):
            lowers = img
        elif img is not None:
            lowers = (f"/tl/lower/{first + k}",)
            k += 1
        disk = lowers[0] if lowers else ""
        if m.kind == "tmpfs":
            size = 0 if m.size is None else max(1, (m.size + 1023) // 1024)
            plan.binds.append(P.BindMsg("/tl/root", m.target, P.BindKind.TMPFS, size_kib=size,
                                        readonly=False))  # fmt: skip
        elif m.kind == "secret":
            plan.binds.append(P.BindMsg("/tl/root", m.target, P.BindKind.DATA, uid=m.uid,
                                        gid=m.gid, mode=m.mode, data=m.data))  # fmt: skip
        elif m.kind == "bind" and m.readonly:
            plan.binds.append(P.BindMsg("/tl/root", m.target, P.BindKind.PATH, disk, name))
        else:
            # Writes go to an overlay on the scratch disk: kept for a host folder (written
            # back after the step), discarded for a view. Views always take the overlay, which
            # also hides any whiteouts their image holds.
            base = f"{step_dir}/m{j}"
            plan.overlays.append(P.MountRequest(lowers, f"{base}/upper", f"{base}/work",
                                                f"{base}/root"))  # fmt: skip
            plan.binds.append(P.BindMsg("/tl/root", m.target, P.BindKind.PATH, f"{base}/root",
                                        name, readonly=m.readonly))  # fmt: skip
            if m.kind == "bind":
                assert m.source is not None
                plan.writeback.append((f"{base}/upper", m.source))
    plan.env = tuple(m.env.encode() + b"=" + m.data for m in req.mounts
                     if m.kind == "secret" and m.env)  # fmt: skip
    for m in req.mounts:
        if m.kind == "secret" and m.env and b"\0" in m.data:
            raise ExecutorError(f"secret for ${m.env} holds a NUL byte; an environment "
                                "variable cannot")  # fmt: skip
    return plan


def apply_upper(upper: Path, dest: Path) -> None:
    """Applies an overlay-style upper (whiteouts delete, opaque folders replace) onto the host
    folder `dest`, moving its files in. Parents come before children and each is made a real
    folder first, so nothing is ever written through a symlink found in `dest`."""
    for rel, st in _walk(upper):
        if rel == ".":
            continue
        src = os.path.join(upper, rel)
        dst = os.path.join(dest, rel)
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            _remove(dst)
            continue
        try:
            cur = os.lstat(dst)
        except FileNotFoundError:
            cur = None
        if stat.S_ISDIR(mode):
            opaque = False
            with contextlib.suppress(OSError):
                opaque = os.getxattr(src, OPAQUE_XATTR, follow_symlinks=False) == b"y"
            if cur is not None and (opaque or not stat.S_ISDIR(cur.st_mode)):
                _remove(dst)
                cur = None
            if cur is None:
                os.mkdir(dst)
            os.chown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(mode))
            continue
        if cur is not None:
            _remove(dst)
        if stat.S_ISREG(mode):
            try:
                os.replace(src, dst)
            except OSError:
                shutil.copy2(src, dst)
                os.chown(dst, st.st_uid, st.st_gid)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            os.lchown(dst, st.st_uid, st.st_gid)
        else:
            os.mknod(dst, mode, st.st_rdev)
            os.chown(dst, st.st_uid, st.st_gid)


def _console_tail(vm: _VM) -> str:
    with contextlib.suppress(OSError):
        lines = (vm.tmp / "console.log").read_text(errors="replace").strip().splitlines()[-10:]
        return "\n" + "\n".join("  | " + line for line in lines)
    return ""
