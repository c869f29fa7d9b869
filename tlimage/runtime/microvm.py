"""The microVM backend: a sandbox is a QEMU `-M microvm` guest (the build executor's kernel,
initramfs and agent) supervised by its own shim process.

    setsid -f python -m tlimage.runtime._vmshim spec.json      (`pids["shim"]`)
      └─ qemu-system-x86_64 -M microvm ...                       (`pids["qemu"]`, dies with it)
           /dev/vdX  the image's layers as cached ext4 images, read-only (hard-linked into the
                     sandbox folder, so a suspended VM finds them byte-identical on resume)
           /dev/vdY  scratch.img: the sandbox's upper and work dirs (kept for named sandboxes)
           tl.ctl    the agent's channel; the shim holds it and lends it to one client at a
                     time on <run dir>/shim.sock (exec, cp, snapshot)

Guest-side, the root is the overlay of the layers and the upper, mounted by MOUNT and turned
into a sandbox by SANDBOX (protocol version 2, runner/PROTOCOL.md): EXEC runs commands chrooted
in it, PUT/GET move archives, SPAWN starts the entrypoint, FREEZE/THAW stop every process
around a snapshot's EXPORT.

Suspend: QMP `stop`, `migrate` to <sandbox>/vmstate, `quit`. Named sandboxes keep their RAM in
a file (`memory-backend-file,share=on` at <sandbox>/ram) and migrate with `x-ignore-shared`, so
the state file holds only device state and suspend is close to instant; resume starts QEMU with
the same command line and `-incoming defer`, connects the channel before the guest runs, and
continues. A suspended microVM survives a host reboot.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tlimage.errors import RuntimeError_
from tlimage.executor.microvm import QMP as _ExecutorQMP
from tlimage.runtime._errors import ExecStartError, ExecTimeout
from tlimage.runtime._state import SandboxRecord, Status
from tlimage.sandbox import proc as _proc

TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
KVM_BOOT_TIMEOUT = 60.0
TCG_BOOT_TIMEOUT = 180.0
CONNECT_TIMEOUT = 600.0  # a client waits this long for another client's request to finish
FRAME_CHUNK = 256 << 10
GUEST_ROOT = "/tl/root"
GUEST_UPPER = "/tl/scratch/upper"
PLACEHOLDERS = ("etc/resolv.conf", "etc/hosts")

Output = Callable[[str, bytes], None]


# --- QMP -------------------------------------------------------------------------------------


class QMP(_ExecutorQMP):
    """The executor's QMP client, failing as a sandbox error."""

    error = RuntimeError_


def wait_migration(qmp: QMP, deadline: float) -> None:
    """Polls until a migration (either side) completed. The incoming side answers `{}` until the
    stream starts, so no status is not an end."""
    delay = 0.001
    while True:
        st = qmp.command("query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError_(f"migration {status}: {st.get('error-desc', 'no detail')}")
        if time.monotonic() > deadline:
            raise RuntimeError_(f"migration did not finish in time (status {status})")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# --- the backend -----------------------------------------------------------------------------


def _exists_in_layers(lowers: list[Path], rel: str) -> bool:
    """Whether the merged view of overlay-style layers has `rel` (top layer first; a whiteout
    or an opaque parent above hides what is below)."""
    parts = rel.split("/")
    for layer in reversed(lowers):
        p = layer / rel
        try:
            st = os.lstat(p)
        except OSError:
            st = None
        if st is not None:
            return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
        for i in range(1, len(parts)):
            parent = layer.joinpath(*parts[:i])
            try:
                pst = os.lstat(parent)
            except OSError:
                break
            if stat.S_ISCHR(pst.st_mode) and pst.st_rdev == 0:
                return False
            with contextlib.suppress(OSError):
                if os.getxattr(parent, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                    return False
    return False


def _pin(src: Path, dest: Path) -> None:
    """A byte-identical copy that costs nothing on the same filesystem (a hard link)."""
    try:
        os.link(src, dest)
    except OSError:
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dest)],
                       check=True, env={"PATH": TOOL_PATH})  # fmt: skip


def _tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise RuntimeError_(f"`{name}` is not installed; microVM sandboxes need it",
                            hint="apt-get install -y util-linux")  # fmt: skip
    return path


def _pythonpath() -> str:
    import tlimage

    return str(Path(tlimage.__file__).resolve().parent.parent)


class MicroVMBackend:
    name = "microvm"

    # -- start ----------------------------------------------------------------------------

    def start(self, rec: SandboxRecord, lowers: list[Path],
              entrypoint: dict[str, Any] | None) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        from tlimage.executor.microvm import lower_images, make_scratch, probe_kvm
        from tlimage.executor.provision import require_tool

        require_tool("qemu-system-x86_64", "to run microVM sandboxes")
        cache = Path(rec.cache_dir) if rec.cache_dir else None
        kit = guest_kit(cache)
        accel = rec.extra.get("accel")
        if accel is None:
            accel = "kvm" if probe_kvm(kit, cache)[0] else "tcg"
        disks_dir = rec.path / "disks"
        disks_dir.mkdir(exist_ok=True)
        disks = []
        for i, img in enumerate(lower_images(tuple(lowers), cache)):
            pinned = disks_dir / f"l{i}.img"
            if not pinned.exists():
                _pin(img, pinned)
            disks.append(pinned)
        scratch = rec.path / "scratch.img"
        if not scratch.exists():
            make_scratch(scratch)
        file_ram = rec.persistent
        rec.run_path.mkdir(parents=True, exist_ok=True)
        argv = qemu_argv(rec, kit, accel, disks, file_ram)
        (rec.path / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
        placeholders = [p for p in PLACEHOLDERS if rec.network
                        and not _exists_in_layers(lowers, p)]  # fmt: skip
        extra = {"accel": accel, "file_ram": file_ram, "placeholders": placeholders,
                 "kernel": kit.kernel_release, "disks": len(disks)}  # fmt: skip
        setup = {
            "mount": {"lowers": [f"/tl/lower/{i}" for i in range(len(disks))],
                      "upper": GUEST_UPPER, "work": "/tl/scratch/work", "target": GUEST_ROOT},
            "sandbox": {"root": GUEST_ROOT, "network": rec.network,
                        "hostname": rec.name or rec.id},
            "entrypoint": entrypoint,
        }  # fmt: skip
        pids, confirm = self._spawn_shim(rec, argv, setup, None, accel)
        return pids, extra, confirm

    def _spawn_shim(self, rec: SandboxRecord, argv: list[str], setup: dict | None,
                    incoming: Path | None, accel: str) -> tuple[dict, Callable[[], None]]:  # fmt: skip
        boot_timeout = KVM_BOOT_TIMEOUT if accel == "kvm" else TCG_BOOT_TIMEOUT
        rec.run_path.mkdir(parents=True, exist_ok=True)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            spec = {
                "id": rec.id, "qemu_argv": argv, "run_dir": str(rec.run_path),
                "dir": str(rec.path), "deadline_file": str(rec.path / "deadline"),
                "exit_file": str(rec.path / "exit.json"), "boot_timeout": boot_timeout,
                "incoming": str(incoming) if incoming else None, "setup": setup,
                "sock_fd": child.fileno(),
            }  # fmt: skip
            spec_path = rec.path / "shim.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            with contextlib.suppress(FileNotFoundError):
                (rec.path / "exit.json").unlink()
            env = {"PATH": TOOL_PATH, "PYTHONPATH": _pythonpath()}
            with open(rec.path / "shim.log", "ab") as log:
                subprocess.run([_tool("setsid"), "-f", sys.executable, "-m",
                                "tlimage.runtime._vmshim", str(spec_path)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               pass_fds=(child.fileno(),), env=env, check=True)  # fmt: skip
            child.close()
            parent.settimeout(boot_timeout + 30)
            try:
                msg = parent.recv(1 << 16).decode("utf-8", "replace")
            except TimeoutError:
                msg = ""
            if not msg.startswith("ready "):
                why = msg.removeprefix("error: ") if msg else _log_tail(rec)
                raise RuntimeError_(f"the microVM sandbox failed to start: {why}")
            info = json.loads(msg[len("ready "):])
            pids = {"shim": _proc.ident(info["shim"]), "qemu": _proc.ident(info["qemu"])}
        except BaseException:
            with contextlib.suppress(OSError):
                child.close()
            parent.close()
            raise

        def confirm() -> None:
            try:
                parent.send(b"go")
            finally:
                parent.close()

        return pids, confirm

    # -- liveness and teardown ------------------------------------------------------------

    def alive(self, rec: SandboxRecord) -> bool:
        if rec.status is Status.SUSPENDED:
            return (rec.path / "vmstate").exists()
        return _proc.alive(rec.pids.get("shim"))

    def survives_reboot(self, rec: SandboxRecord) -> bool:
        return rec.status is Status.SUSPENDED and (rec.path / "vmstate").exists()

    def stop(self, rec: SandboxRecord) -> None:
        shim, qemu = rec.pids.get("shim"), rec.pids.get("qemu")
        if _proc.signal_entry(shim, signal.SIGTERM) and _proc.wait_dead([shim, qemu], 5):
            return
        _proc.signal_entry(shim, signal.SIGKILL)
        _proc.signal_entry(qemu, signal.SIGKILL)
        _proc.wait_dead([shim, qemu], 10)

    def cleanup(self, rec: SandboxRecord, keep_fs: bool) -> None:
        shutil.rmtree(rec.run_path, ignore_errors=True)
        for name in ("ram", "vmstate", "vmstate.tmp", "suspended"):
            with contextlib.suppress(FileNotFoundError):
                (rec.path / name).unlink()
        shutil.rmtree(rec.path / "disks", ignore_errors=True)
        if not keep_fs:
            with contextlib.suppress(FileNotFoundError):
                (rec.path / "scratch.img").unlink()

    def exit_info(self, rec: SandboxRecord) -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((rec.path / "exit.json").read_text())
        return None

    def set_deadline(self, rec: SandboxRecord, deadline: float | None) -> None:
        path = rec.path / "deadline"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("" if deadline is None else repr(deadline))
        os.replace(tmp, path)

    # -- the agent, through the shim ------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self, rec: SandboxRecord) -> Iterator[_Conn]:
        if not _proc.alive(rec.pids.get("shim")):
            raise RuntimeError_(f"sandbox {rec.id} is not running (its VM is gone)")
        conn = _Conn(rec.run_path / "shim.sock")
        try:
            yield conn
        finally:
            conn.close()

    def exec(
        self,
        rec: SandboxRecord,
        argv: list[str],
        env: list[str],
        user: str,
        workdir: str,
        *,
        stdin: bytes | int | None = None,
        on_output: Output | None = None,
        passthrough: bool = False,
        timeout: float | None = None,
    ) -> int:
        from tlimage.executor import protocol as P

        emit = on_output or (lambda _s, _b: None)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._connect(rec) as c:
            c.send(P.encode_exec(P.ExecMsg(tuple(argv), tuple(env), user, workdir,
                                           stdin is not None)))  # fmt: skip
            feeder = None
            if isinstance(stdin, bytes):
                for i in range(0, len(stdin), FRAME_CHUNK):
                    c.send(P.encode_stdin(stdin[i : i + FRAME_CHUNK]))
                c.send(P.encode_stdin(b""))
            elif isinstance(stdin, int):
                feeder = threading.Thread(target=_feed_stdin, args=(c, stdin), daemon=True)
                feeder.start()
            try:
                while True:
                    try:
                        f = c.recv(deadline)
                    except EOFError:
                        raise RuntimeError_(f"sandbox {rec.id} ended while the command ran: "
                                            f"{shlex.join(argv)}") from None  # fmt: skip
                    except TimeoutError:
                        c.send(P.encode_kill(signal.SIGKILL))
                        raise ExecTimeout(f"command timed out after {timeout:g} s: "
                                          f"{shlex.join(argv)}") from None  # fmt: skip
                    if f.type in (P.FrameType.STDOUT, P.FrameType.STDERR):
                        out = f.type is P.FrameType.STDOUT
                        if passthrough:
                            _write_fd(1 if out else 2, f.payload)
                        else:
                            emit("stdout" if out else "stderr", f.payload)
                    elif f.type is P.FrameType.EXIT:
                        return P.decode_exit(f).code
                    elif f.type is P.FrameType.ERROR:
                        raise ExecStartError(P.decode_error(f))
                    else:
                        raise P.ProtocolError(f"unexpected {f.type.name} frame during EXEC")
            except KeyboardInterrupt:
                with contextlib.suppress(OSError):
                    c.send(P.encode_kill(signal.SIGINT))
                raise

    def put(self, rec: SandboxRecord, src: Path, dest: str) -> str:
        from tlimage.executor import protocol as P
        from tlimage.runtime.namespace import write_tar

        if not os.path.lexists(src):
            raise RuntimeError_(f"{src}: no such file or directory")
        with self._connect(rec) as c:
            c.send(P.encode_put(dest, src.name or "root"))
            f = c.recv(None)
            if f.type is P.FrameType.ERROR:
                raise RuntimeError_(f"cp into {rec.id}:{dest} failed: {P.decode_error(f)}")
            target = P.decode_path(f)
            sink = _TarWriter(c)
            write_tar(src, sink, arcname=os.path.basename(target))
            sink.flush()
            c.send(P.encode_tar(b""))
            f = c.recv(None)
            if f.type is P.FrameType.ERROR:
                raise RuntimeError_(f"cp into {rec.id}:{dest} failed: {P.decode_error(f)}")
            return target

    def get(self, rec: SandboxRecord, src: str, dest: Path) -> Path:
        from tlimage.executor import protocol as P
        from tlimage.runtime.namespace import host_target, read_tar

        with self._connect(rec) as c:
            c.send(P.encode_get(src))
            first = c.recv(None)
            if first.type is P.FrameType.ERROR:
                raise RuntimeError_(f"cp from {rec.id}:{src} failed: {P.decode_error(first)}")
            stream = _TarStream(c, first)
            base = os.path.basename(src.rstrip("/"))
            target = host_target(dest, base or "root")
            read_tar(stream, target, top=base or ".")
            end = stream.finish()
            if end.type is P.FrameType.ERROR:
                raise RuntimeError_(f"cp from {rec.id}:{src} failed: {P.decode_error(end)}")
            return target

    # -- snapshot -------------------------------------------------------------------------

    @contextlib.contextmanager
    def frozen_upper(self, rec: SandboxRecord, dest: Path, lowers: list[Path],
                     running: bool) -> Iterator[None]:  # fmt: skip
        """The guest's upper, exported while every guest process is stopped (FREEZE), as an
        overlay-style folder at `dest`; placeholders the sandbox created are left out."""
        from tlimage.executor import protocol as P
        from tlimage.executor.base import OPAQUE_XATTR, normalize_upper
        from tlimage.executor.microvm import _safe_join, unpack_export

        if not running:
            raise RuntimeError_(f"cannot snapshot sandbox {rec.id} while it is suspended: a "
                                "suspended microVM has no running agent",
                                hint=f"resume it first: tl sbx resume {rec.name or rec.id}")
        # On any failure the connection closes mid-request, and the shim discards the rest of
        # the export and thaws the guest.
        with self._connect(rec) as c:
            _ok(c, P.encode_freeze(), "FREEZE")
            c.send(P.encode_export(GUEST_UPPER))
            dest.mkdir()
            first = c.recv(None)
            stream = _TarStream(c, first)
            if first.type is P.FrameType.TAR:
                unpack_export(stream, dest)
            end = stream.finish()
            _ok(c, P.encode_thaw(), "THAW")
        if end.type is P.FrameType.ERROR:
            raise RuntimeError_(f"exporting sandbox {rec.id}'s changes failed: "
                                f"{P.decode_error(end)}")  # fmt: skip
        meta = P.decode_export_end(end)
        for rel, name, value in meta.xattrs:
            os.setxattr(_safe_join(dest, rel), name, value, follow_symlinks=False)
        for rel in meta.opaque:
            os.setxattr(_safe_join(dest, rel), OPAQUE_XATTR, b"y", follow_symlinks=False)
        for rel in rec.extra.get("placeholders", []):
            p = dest / rel
            with contextlib.suppress(OSError):
                if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
                    p.unlink()
        normalize_upper(dest, tuple(lowers))
        yield

    def thaw(self, rec: SandboxRecord) -> None:
        from tlimage.executor import protocol as P

        with contextlib.suppress(Exception), self._connect(rec) as c:
            _ok(c, P.encode_thaw(), "THAW")

    # -- suspend --------------------------------------------------------------------------

    def suspend(self, rec: SandboxRecord) -> dict:
        if not rec.extra.get("file_ram"):
            raise RuntimeError_(f"sandbox {rec.id} has no file-backed memory and cannot be "
                                "suspended")  # fmt: skip
        deadline = time.monotonic() + 120
        with self._connect(rec) as _exclusive:  # no request of another client is in flight
            _exclusive.wait_turn()
            qmp = QMP(str(rec.run_path / "qmp.sock"), deadline)
            try:
                qmp.command("stop")
                qmp.command("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": True}])
                tmp = rec.path / "vmstate.tmp"
                qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
                wait_migration(qmp, deadline)
                os.replace(tmp, rec.path / "vmstate")
                (rec.path / "suspended").write_text("")
                with contextlib.suppress(EOFError, OSError):
                    qmp.command("quit")
            finally:
                qmp.close()
        _proc.wait_dead([rec.pids.get("shim"), rec.pids.get("qemu")], 30)
        shutil.rmtree(rec.run_path, ignore_errors=True)
        return {"memory_snapshot": True, "note": None, "changes": {"pids": {}}}

    def abort_suspend(self, rec: SandboxRecord) -> None:
        """A failed suspend: the VM continues where it stopped (if QEMU still runs)."""
        for name in ("suspended", "vmstate.tmp", "vmstate"):
            with contextlib.suppress(FileNotFoundError):
                (rec.path / name).unlink()
        if _proc.alive(rec.pids.get("qemu")):
            qmp = QMP(str(rec.run_path / "qmp.sock"), time.monotonic() + 10)
            try:
                qmp.command("cont")
            finally:
                qmp.close()

    def rollback_suspend(self, rec: SandboxRecord) -> Status:
        if not _proc.alive(rec.pids.get("shim")) and (rec.path / "vmstate").exists():
            return Status.SUSPENDED
        with contextlib.suppress(Exception):
            self.abort_suspend(rec)
        return Status.RUNNING

    def resume(self, rec: SandboxRecord, deadline: float | None) -> dict:
        state = rec.path / "vmstate"
        if not state.exists():
            raise RuntimeError_(f"sandbox {rec.id} has no saved state at {state}")
        self.set_deadline(rec, deadline)
        with contextlib.suppress(FileNotFoundError):
            (rec.path / "suspended").unlink()
        argv = json.loads((rec.path / "qemu-argv.json").read_text())
        pids, confirm = self._spawn_shim(rec, argv, None, state, rec.extra.get("accel", "tcg"))
        confirm()
        state.unlink()
        return {"pids": pids}


def guest_kit(cache: Path | None):  # noqa: ANN201 - a GuestKit
    """The executor's provisioned kernel and initramfs (remembered across starts by
    `provision` itself)."""
    from tlimage.executor.provision import provision

    return provision(cache)


def qemu_argv(rec: SandboxRecord, kit, accel: str, disks: list[Path],
              file_ram: bool) -> list[str]:  # noqa: ANN001 - a GuestKit  # fmt: skip
    from tlimage.executor.microvm import host_tsc_khz
    from tlimage.executor.provision import require_tool

    qemu = require_tool("qemu-system-x86_64", "to run microVM sandboxes")
    run = rec.run_path
    cpus = max(1, min(math.ceil(rec.cpus), os.cpu_count() or 1))
    append = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "rdinit=/init",
              f"tl.epoch={int(time.time())}"]
    khz = host_tsc_khz()
    if khz and accel == "tcg":
        append.append(f"tsc_early_khz={khz}")
    if rec.network:
        append.append("tl.net=1")
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
    cmd = [qemu]
    if file_ram:
        machine += ",memory-backend=mem"
        cmd += ["-object", f"memory-backend-file,id=mem,size={rec.memory_mb}M,"
                f"mem-path={rec.path / 'ram'},share=on"]
    cmd += ["-M", machine, "-m", f"{rec.memory_mb}M", "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kit.kernel), "-initrd", str(kit.initrd), "-append", " ".join(append),
            "-chardev", f"file,id=con,path={rec.path / 'console.log'},append=on",
            "-serial", "chardev:con",
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=ctl,path={run / 'ctl.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=tl.ctl",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0"]  # fmt: skip
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        cmd += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    for i, disk in enumerate(disks):
        cmd += ["-drive", f"id=l{i},file={disk},format=raw,if=none,readonly=on",
                "-device", f"virtio-blk-device,drive=l{i},serial=tl-l{i}"]
    cmd += ["-drive", f"id=scratch,file={rec.path / 'scratch.img'},format=raw,if=none,"
            "discard=unmap",
            "-device", "virtio-blk-device,drive=scratch,serial=tl-scratch"]  # fmt: skip
    if rec.network:
        cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
    return cmd


# --- client side of the shim -----------------------------------------------------------------


class _Conn:
    """Frames to and from the agent, through the shim (which serves one client at a time)."""

    def __init__(self, path: Path) -> None:
        from tlimage.executor.microvm import _Channel

        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise RuntimeError_(f"cannot reach the sandbox's shim at {path}: {e.strerror}") from None
        self.chan = _Channel(sock)
        self.lock = threading.Lock()

    def send(self, frame) -> None:  # noqa: ANN001 - a protocol Frame
        with self.lock:
            self.chan.send(frame)

    def recv(self, deadline: float | None):  # noqa: ANN201 - a protocol Frame
        if deadline is None:
            deadline = time.monotonic() + CONNECT_TIMEOUT
        return self.chan.recv(deadline)

    def wait_turn(self) -> None:
        """Returns once the shim serves this client (an ATTACH round trip)."""
        from tlimage.executor import protocol as P

        self.send(P.encode_attach(time.time_ns()))
        f = self.recv(None)
        if f.type is not P.FrameType.HELLO:
            raise P.ProtocolError(f"expected HELLO after ATTACH, got {f.type.name}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.chan.sock.close()


def _ok(c: _Conn, frame, what: str) -> None:  # noqa: ANN001 - a protocol Frame
    from tlimage.executor import protocol as P

    c.send(frame)
    f = c.recv(None)
    if f.type is P.FrameType.ERROR:
        raise RuntimeError_(f"guest agent {what}: {P.decode_error(f)}")
    if f.type is not P.FrameType.OK:
        raise P.ProtocolError(f"expected OK after {what}, got {f.type.name}")


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _feed_stdin(c: _Conn, fd: int) -> None:
    from tlimage.executor import protocol as P

    with contextlib.suppress(OSError):
        while True:
            data = os.read(fd, FRAME_CHUNK)
            c.send(P.encode_stdin(data))
            if not data:
                return


class _TarWriter:
    """A file-like sink that sends what is written as TAR frames."""

    def __init__(self, c: _Conn) -> None:
        self.c = c
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        from tlimage.executor import protocol as P

        self.buf += data
        while len(self.buf) >= FRAME_CHUNK:
            self.c.send(P.encode_tar(bytes(self.buf[:FRAME_CHUNK])))
            del self.buf[:FRAME_CHUNK]
        return len(data)

    def flush(self) -> None:
        from tlimage.executor import protocol as P

        if self.buf:
            self.c.send(P.encode_tar(bytes(self.buf)))
            self.buf.clear()

    def close(self) -> None:
        self.flush()


class _TarStream(io.RawIOBase):
    """A readable stream over TAR frames, starting with `first`; the frame that ends it is
    returned by `finish()`."""

    def __init__(self, c: _Conn, first) -> None:  # noqa: ANN001 - a protocol Frame
        from tlimage.executor import protocol as P

        super().__init__()
        self.c = c
        self.pending = first.payload if first.type is P.FrameType.TAR else b""
        self.end = None if first.type is P.FrameType.TAR else first

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - a writable buffer
        from tlimage.executor import protocol as P

        while not self.pending and self.end is None:
            f = self.c.recv(None)
            if f.type is P.FrameType.TAR:
                self.pending = f.payload
            else:
                self.end = f
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        pass  # readers (tarfile, BufferedReader) close it; the frames that remain are ours

    def finish(self):  # noqa: ANN201 - a protocol Frame
        while self.end is None:
            self.pending = b""
            self.readinto(bytearray(1 << 16))
        return self.end


def _log_tail(rec: SandboxRecord) -> str:
    lines: list[str] = []
    for name in ("shim.log", "qemu.log", "console.log"):
        with contextlib.suppress(OSError):
            lines += (rec.path / name).read_text(errors="replace").strip().splitlines()[-6:]
    return "\n".join("  | " + line for line in lines) or "the shim exited without saying why"
