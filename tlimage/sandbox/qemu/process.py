"""A QEMU `-M microvm` guest: its command line and its process's lifetime.

    host                                        guest (runner/init, runner/agent.c)
    ext4 images (disks.py)                 -->  /dev/vdX (serial tl-l<N>), read-only
    sparse ext4 scratch image              -->  /dev/vdY (serial tl-scratch)
    unix socket <---- virtio-serial "tl.ctl" ---> agent (channel.py, protocol.py)
    QMP unix socket (qmp.py)                    (quit, query-kvm, stop, migrate)

`qemu_command` is the one command line, for build steps (`VM`, below) and for sandboxes (the
runtime adds file-backed RAM so a suspend can keep it). A VM never outlives the process that
started it: QEMU gets PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tlimage.errors import ExecutorError
from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu.channel import Channel
from tlimage.sandbox.qemu.disks import DEFAULT_SCRATCH, make_scratch
from tlimage.sandbox.qemu.provision import GuestKit, require_tool
from tlimage.sandbox.qemu.qmp import QMP

if TYPE_CHECKING:
    from tlimage.sandbox.network import NetHandle, NetworkPolicy

DEFAULT_MEMORY_MB = 2048
PR_SET_PDEATHSIG = 1
MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=on"


class BootError(ExecutorError):
    """QEMU exited or the guest agent did not answer in time."""


def die_with_parent() -> None:
    """For `preexec_fn` (the child side of fork, before exec): SIGKILL when the parent dies."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
# What QEMU's own DNS forwarder reads in its private mount namespace: slirp4netns's forwarder.
QEMU_RESOLV_CONF = "nameserver 10.0.2.3\n"


def _private_network(resolv_conf: bytes) -> None:
    """Child side of fork: fresh network and mount namespaces, /etc/resolv.conf replaced."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    libc.mount(resolv_conf, b"/etc/resolv.conf", None, MS_BIND, None)  # none there: no DNS


def start_qemu(argv: list[str], log: Path, *, network_dir: Path | None,
               new_session: bool = False,
               policy: NetworkPolicy | None = None) -> tuple[subprocess.Popen, NetHandle | None]:  # fmt: skip
    """Starts QEMU (dying with this process) and returns it with its network's handle.

    Without `network_dir` the guest has no NIC (the command line has none), so QEMU shares
    the host's namespaces. With it, QEMU starts in a network namespace of its own whose only
    way out is `sandbox.network.attach` (slirp4netns and nft rules written from the host,
    `policy`, default: the internet but none of the host's addresses, 127.0.0.1 included, nor
    private ranges). QEMU's user-mode network then only relays: the guest's 10.0.2.2 is the
    namespace's empty loopback. A private mount namespace gives QEMU's DNS forwarder
    slirp4netns's resolver (`network_dir`/resolv.conf). The handle's helper ends when the
    handle is closed or this process exits."""
    from tlimage.sandbox import network as net

    preexec = die_with_parent
    if network_dir is not None:
        problem = net.check_host()
        if problem is None and os.geteuid() != 0:
            problem = "it needs root (a network namespace of its own)"
        if problem is not None:
            raise ExecutorError(f"a microVM with network cannot be isolated from the host: "
                                f"{problem}")  # fmt: skip
        resolv = network_dir / "resolv.conf"
        resolv.write_text(QEMU_RESOLV_CONF)
        path = os.fsencode(resolv)

        def preexec() -> None:
            die_with_parent()
            _private_network(path)

    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=new_session, preexec_fn=preexec)  # fmt: skip
        except subprocess.SubprocessError as e:  # raised in preexec_fn
            raise ExecutorError(f"QEMU could not start in a network namespace of its own: "
                                f"{e}") from None  # fmt: skip
    if network_dir is None:
        return proc, None
    try:
        handle = net.attach(proc.pid, policy or net.NetworkPolicy(),
                            log_path=str(network_dir / "net.log"))  # fmt: skip
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, handle


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


def qemu_command(kit: GuestKit, accel: str, *, memory_mb: int, cpus: int, disks: list[Path],
                 scratch: Path, console: Path, qmp: Path, ctl: Path, network: bool,
                 ram_file: Path | None = None, scratch_cache_unsafe: bool = False,
                 boot_init: bool = False, why: str = "to run a microVM") -> list[str]:  # fmt: skip
    """QEMU's argv. `disks` are attached read-only (serial tl-l<i>), `scratch` writable
    (serial tl-scratch); `ram_file` backs the guest's RAM with a shared file (for suspend);
    `scratch_cache_unsafe` skips flushes to a scratch disk that is thrown away; `boot_init`
    (a sandbox of an image whose init is systemd) has the guest boot the root's /sbin/init as
    PID 1 once the sandbox is set up (runner/init, tl.init=systemd)."""
    qemu = require_tool("qemu-system-x86_64", why)
    append = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "reboot=t",
        "rdinit=/init",
        f"tl.epoch={int(time.time())}",
    ]
    khz = host_tsc_khz()
    if khz and accel == "tcg":
        append.append(f"tsc_early_khz={khz}")
    if network:
        append.append("tl.net=1")
    if boot_init:
        # The image has no modules of the guest's kernel (the initramfs loads what it needs),
        # so systemd's module loader has nothing to do and would only fail.
        append += ["tl.init=systemd", "systemd.mask=systemd-modules-load.service"]
    machine = MACHINE
    cmd = [qemu]
    if ram_file is not None:
        machine += ",memory-backend=mem"
        cmd += [
            "-object",
            f"memory-backend-file,id=mem,size={memory_mb}M,mem-path={ram_file},share=on",
        ]
    cmd += ["-M", machine, "-m", f"{memory_mb}M", "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kit.kernel), "-initrd", str(kit.initrd), "-append", " ".join(append),
            "-chardev", f"file,id=con,path={console},append=on",
            "-serial", "chardev:con",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=tl.ctl",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0"]  # fmt: skip
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        cmd += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    for i, disk in enumerate(disks):
        cmd += [
            "-drive",
            f"id=l{i},file={disk},format=raw,if=none,readonly=on",
            "-device",
            f"virtio-blk-device,drive=l{i},serial=tl-l{i}",
        ]
    cache = "cache=unsafe," if scratch_cache_unsafe else ""
    cmd += [
        "-drive",
        f"id=scratch,file={scratch},format=raw,if=none,{cache}discard=unmap",
        "-device",
        "virtio-blk-device,drive=scratch,serial=tl-scratch",
    ]
    if network:
        cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
    return cmd


@dataclass
class VM:
    """One QEMU microvm guest with a fresh scratch disk, its agent channel and QMP; ended by
    `shutdown` (graceful) or `kill`."""

    kit: GuestKit
    accel: str  # "kvm" | "tcg"
    disks: list[Path]
    network: bool
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = 0  # 0: min(2, host cores)
    scratch_size: int = DEFAULT_SCRATCH
    why: str = "to run build steps in a microVM"  # for the missing-QEMU error
    tmp: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)
    chan: Channel | None = field(default=None, init=False)
    qmp: QMP | None = field(default=None, init=False)
    net: NetHandle | None = field(default=None, init=False)
    boot_seconds: float = field(default=0.0, init=False)

    def command_line(self) -> list[str]:
        return qemu_command(
            self.kit, self.accel, memory_mb=self.memory_mb,
            cpus=self.cpus or min(2, os.cpu_count() or 1), disks=self.disks,
            scratch=self.tmp / "scratch.img", scratch_cache_unsafe=True,
            console=self.tmp / "console.log", qmp=self.tmp / "qmp.sock",
            ctl=self.tmp / "ctl.sock", network=self.network, why=self.why,
        )  # fmt: skip

    def start(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tl-vm-"))  # short: unix socket paths <108
        try:
            make_scratch(self.tmp / "scratch.img", self.scratch_size)
            self.proc, self.net = start_qemu(
                self.command_line(), self.tmp / "qemu.log", new_session=True,
                network_dir=self.tmp if self.network else None)  # fmt: skip
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
            self.chan = Channel(sock)
            with contextlib.suppress(OSError, EOFError, ExecutorError):
                self.qmp = QMP(self.tmp / "qmp.sock")
            try:
                hello = self.chan.recv(deadline)
            except TimeoutError:
                raise self._boot_error(
                    f"the guest agent did not answer within {timeout:g} s"
                ) from None
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
        return BootError(
            f"microVM ({self.accel}) failed to boot: {what}" + (f"\n{detail}" if detail else "")
        )

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
        if self.net is not None:
            self.net.close()
            self.net = None
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def console_tail(vm: VM) -> str:
    with contextlib.suppress(OSError):
        lines = (vm.tmp / "console.log").read_text(errors="replace").strip().splitlines()[-10:]
        return "\n" + "\n".join("  | " + line for line in lines)
    return ""
