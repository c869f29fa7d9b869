"""The microVM backend: a sandbox is a QEMU `-M microvm` guest (the build executor's kernel,
initramfs and agent; tlimage.sandbox.qemu) supervised by its own shim process.

    setsid -f python -m tlimage.sandbox.qemu.shim spec.json    (`pids["shim"]`)
      └─ qemu-system-x86_64 -M microvm ...                       (`pids["qemu"]`, dies with it)
           /dev/vdX  the image's layers as cached ext4 images, read-only (hard-linked into the
                     sandbox folder, so a suspended VM finds them byte-identical on resume)
           /dev/vdY  scratch.img: the sandbox's upper and work dirs (kept for named sandboxes)
           tl.ctl    the agent's channel; the shim holds it and serves clients on
                     <run dir>/shim.sock, each connection an agent session of its own (protocol
                     version 4), so execs, spawned processes, terminals, file operations and
                     copies run at the same time

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
import json
import math
import os
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tlimage._fs import write_atomic
from tlimage.errors import RuntimeError_
from tlimage.runtime._errors import ExecStartError, ExecTimeout
from tlimage.runtime._state import SandboxRecord, Status
from tlimage.sandbox import proc as _proc
from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu import qmp as _qmp
from tlimage.sandbox.qemu.channel import Channel, TarFrames, apply_export_end, unpack_export
from tlimage.sandbox.qemu.disks import lower_images, make_scratch
from tlimage.sandbox.qemu.kvm import probe_kvm
from tlimage.sandbox.qemu.process import qemu_command
from tlimage.sandbox.qemu.provision import GuestKit, provision, require_tool
from tlimage.sandbox.upper import normalize_upper

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


class QMP(_qmp.QMP):
    """The sandbox's QMP client, failing as a sandbox error."""

    error = RuntimeError_


wait_migration = _qmp.wait_migration


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
        if file_ram:  # the guest's RAM (secrets in its processes' environments included)
            os.chmod(rec.path, 0o700)
            fd = os.open(rec.path / "ram", os.O_WRONLY | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        argv = qemu_argv(rec, kit, accel, disks, file_ram)
        (rec.path / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
        placeholders = [p for p in PLACEHOLDERS if rec.network
                        and not _exists_in_layers(lowers, p)]  # fmt: skip
        extra = {"accel": accel, "file_ram": file_ram, "placeholders": placeholders,
                 "kernel": kit.kernel_release, "disks": len(disks)}  # fmt: skip
        secret_env: list[str] = []
        if entrypoint is not None:  # its secrets go to the shim on its socket, not in shim.json
            secret_env = list(entrypoint.get("secret_env") or [])
            entrypoint = {k: v for k, v in entrypoint.items() if k != "secret_env"}
        setup = {
            "mount": {"lowers": [f"/tl/lower/{i}" for i in range(len(disks))],
                      "upper": GUEST_UPPER, "work": "/tl/scratch/work", "target": GUEST_ROOT},
            "sandbox": {"root": GUEST_ROOT, "network": rec.network,
                        "hostname": rec.name or rec.id},
            "entrypoint": entrypoint,
        }  # fmt: skip
        pids, confirm = self._spawn_shim(rec, argv, setup, None, accel, secret_env)
        return pids, extra, confirm

    def _spawn_shim(self, rec: SandboxRecord, argv: list[str], setup: dict | None,
                    incoming: Path | None, accel: str,
                    secret_env: list[str] | None = None) -> tuple[dict, Callable[[], None]]:  # fmt: skip
        boot_timeout = KVM_BOOT_TIMEOUT if accel == "kvm" else TCG_BOOT_TIMEOUT
        rec.run_path.mkdir(parents=True, exist_ok=True)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            spec = {
                "id": rec.id, "qemu_argv": argv, "run_dir": str(rec.run_path),
                "dir": str(rec.path), "deadline_file": str(rec.path / "deadline"),
                "exit_file": str(rec.path / "exit.json"), "boot_timeout": boot_timeout,
                "incoming": str(incoming) if incoming else None, "setup": setup,
                "sock_fd": child.fileno(), "network": rec.network,
                "network_policy": rec.extra.get("network_policy"),
                "secret_env_follows": bool(secret_env),
                "stop_grace": stop_grace(rec, accel),
            }  # fmt: skip
            spec_path = rec.path / "shim.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            with contextlib.suppress(FileNotFoundError):
                (rec.path / "exit.json").unlink()
            env = {"PATH": TOOL_PATH, "PYTHONPATH": _pythonpath()}
            with open(rec.path / "shim.log", "ab") as log:
                subprocess.run([_tool("setsid"), "-f", sys.executable, "-m",
                                "tlimage.sandbox.qemu.shim", str(spec_path)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               pass_fds=(child.fileno(),), env=env, check=True)  # fmt: skip
            child.close()
            if secret_env:
                parent.settimeout(30)
                parent.send(json.dumps(secret_env).encode())
            parent.settimeout(boot_timeout + 30)
            try:
                msg = parent.recv(1 << 16).decode("utf-8", "replace")
            except TimeoutError:
                msg = ""
            if not msg.startswith("ready "):
                why = msg.removeprefix("error: ") if msg else _log_tail(rec)
                raise RuntimeError_(f"the microVM sandbox failed to start: {why}")
            info = json.loads(msg[len("ready ") :])
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
        grace = stop_grace(rec, rec.extra.get("accel") or "tcg")
        if _proc.signal_entry(shim, signal.SIGTERM) and _proc.wait_dead([shim, qemu], grace + 5):
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
        write_atomic(rec.path / "deadline", "" if deadline is None else repr(deadline))

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
        return self._exec(rec, argv, env, user, workdir, stdin=stdin, on_output=on_output,
                          passthrough=passthrough, timeout=timeout)  # fmt: skip

    def exec_watched(self, rec: SandboxRecord, argv: list[str], env: list[str], user: str,
                     workdir: str, *, on_output: Output,
                     on_start: Callable[[int], None]) -> int:  # fmt: skip
        """As exec; `on_start` hears the program's pid in the guest once it runs (a spawned
        process's supervisor records it for `ps`, and `signal` reaches it by it)."""
        return self._exec(rec, argv, env, user, workdir, on_output=on_output, on_start=on_start)

    def _exec(self, rec: SandboxRecord, argv: list[str], env: list[str], user: str,
              workdir: str, *, stdin: bytes | int | None = None,
              on_output: Output | None = None, passthrough: bool = False,
              timeout: float | None = None,
              on_start: Callable[[int], None] | None = None) -> int:  # fmt: skip
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
                    elif f.type is P.FrameType.PID:
                        if on_start is not None:
                            on_start(P.decode_pid(f))
                    else:
                        raise P.ProtocolError(f"unexpected {f.type.name} frame during EXEC")
            except KeyboardInterrupt:
                with contextlib.suppress(OSError):
                    c.send(P.encode_kill(signal.SIGINT))
                raise

    def signal(self, rec: SandboxRecord, pid: int, signum: int) -> None:
        """Sends `signum` to the guest process `pid` (as EXEC's `on_start` named it)."""
        with self._connect(rec) as c:
            _ok(c, P.encode_signal(pid, signum), f"signal {signum} to process {pid}")

    def fs(self, rec: SandboxRecord, op: str, path: str, **args: Any) -> Any:
        """One file operation (`stat`, `list`, `mkdir`, `remove`) in the sandbox's root, done by
        the agent with every path resolved inside the root (openat2 RESOLVE_IN_ROOT: a planted
        link cannot lead out); returns the JSON result the namespace backend gives."""
        F = P.FsFlag
        if op == "stat":
            fop = P.FsOp.STAT
            flags = (F.FOLLOW if args.get("follow") else 0) | (
                F.MISSING_OK if args.get("missing_ok") else 0)  # fmt: skip
        elif op == "list":
            fop, flags = P.FsOp.LIST, 0
        elif op == "mkdir":
            fop, flags = P.FsOp.MKDIR, F.PARENTS if args.get("parents") else 0
        elif op == "remove":
            fop, flags = P.FsOp.REMOVE, F.RECURSIVE if args.get("recursive") else 0
        else:
            raise RuntimeError_(f"unknown file operation {op!r}")
        listing: list[dict] = []
        with self._connect(rec) as c:
            c.send(P.encode_fs(P.FsMsg(fop, path, int(flags), int(args.get("perm", 0o755)))))
            while True:
                f = c.recv(None)
                if f.type is P.FrameType.STAT:
                    entry = P.decode_stat(f).to_json()
                    if fop is not P.FsOp.LIST:
                        return entry
                    listing.append(entry)
                elif f.type is P.FrameType.OK:
                    return listing if fop is P.FsOp.LIST else (
                        {"path": path} if fop is P.FsOp.REMOVE else None)  # fmt: skip
                elif f.type is P.FrameType.ERROR:
                    raise RuntimeError_(f"{op} {rec.id}:{path} failed: {P.decode_error(f)}")
                else:
                    raise P.ProtocolError(f"unexpected {f.type.name} frame during FS")

    def exec_tty(self, rec: SandboxRecord, argv: list[str], env: list[str], user: str,
                 workdir: str, winsize: tuple[int, int]) -> tuple[int, Callable[[], int]]:  # fmt: skip
        """Starts argv on a terminal of the guest (PTY). Returns the master of a local
        pseudo-terminal whose raw other side is pumped to and from the guest's (window size
        changes made on the master travel as WINSIZE) and a function returning the exit code."""
        import fcntl
        import pty
        import termios
        import tty

        rows, cols = winsize
        master, slave = pty.openpty()
        tty.setraw(slave)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        try:
            c = _Conn(rec.run_path / "shim.sock") if _proc.alive(rec.pids.get("shim")) else None
            if c is None:
                raise RuntimeError_(f"sandbox {rec.id} is not running (its VM is gone)")
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        try:
            c.send(P.encode_pty(P.PtyMsg(tuple(argv), tuple(env), user, workdir, rows, cols)))
            f = c.recv(None)
            if f.type is P.FrameType.ERROR:
                raise ExecStartError(P.decode_error(f))
            if f.type is not P.FrameType.PID:
                raise P.ProtocolError(f"unexpected {f.type.name} frame after PTY")
        except BaseException:
            c.close()
            os.close(master)
            os.close(slave)
            raise
        done = threading.Event()
        result: dict[str, Any] = {}

        def from_guest() -> None:
            try:
                while True:
                    f = c.chan.recv(None)
                    if f.type is P.FrameType.STDOUT:
                        _write_fd(slave, f.payload)
                    elif f.type is P.FrameType.EXIT:
                        result["code"] = P.decode_exit(f).code
                        return
                    elif f.type is P.FrameType.ERROR:
                        result["error"] = P.decode_error(f)
                        return
            except (EOFError, OSError) as e:
                result["error"] = str(e)
            finally:
                done.set()

        def to_guest() -> None:
            import select

            size = (rows, cols)
            try:
                while not done.is_set():
                    ready, _, _ = select.select([slave], [], [], 0.1)
                    now = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
                    if now[:2] != size:
                        size = now[:2]
                        c.send(P.encode_winsize(*size))
                    if ready:
                        data = os.read(slave, FRAME_CHUNK)
                        if data:
                            c.send(P.encode_stdin(data))
            except OSError:
                pass
            finally:
                os.close(slave)  # the relay reading the master sees the end

        threading.Thread(target=from_guest, daemon=True).start()
        pump = threading.Thread(target=to_guest, daemon=True)
        pump.start()

        def finish() -> int:
            done.wait()
            pump.join()
            c.close()
            if "code" in result:
                return int(result["code"])
            raise RuntimeError_(f"the terminal of sandbox {rec.id} ended: "
                                f"{result.get('error', 'no exit status')}")  # fmt: skip

        return master, finish

    def put(self, rec: SandboxRecord, src: Path, dest: str) -> str:
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
        from tlimage.runtime.namespace import host_target, read_tar

        with self._connect(rec) as c:
            c.send(P.encode_get(src))
            first = c.recv(None)
            if first.type is P.FrameType.ERROR:
                raise RuntimeError_(f"cp from {rec.id}:{src} failed: {P.decode_error(first)}")
            stream = TarFrames(c, first=first)
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
        if not running:
            raise RuntimeError_(
                f"cannot snapshot sandbox {rec.id} while it is suspended: a "
                "suspended microVM has no running agent",
                hint=f"resume it first: tl sbx resume {rec.name or rec.id}",
            )
        # On any failure the connection closes mid-request, and the shim discards the rest of
        # the export and thaws the guest.
        with self._connect(rec) as c:
            _ok(c, P.encode_freeze(), "FREEZE")
            c.send(P.encode_export(GUEST_UPPER))
            dest.mkdir()
            first = c.recv(None)
            stream = TarFrames(c, first=first)
            if first.type is P.FrameType.TAR:
                unpack_export(stream, dest)
            end = stream.finish()
            _ok(c, P.encode_thaw(), "THAW")
        if end.type is P.FrameType.ERROR:
            raise RuntimeError_(f"exporting sandbox {rec.id}'s changes failed: "
                                f"{P.decode_error(end)}")  # fmt: skip
        apply_export_end(dest, P.decode_export_end(end))
        for rel in rec.extra.get("placeholders", []):
            p = dest / rel
            with contextlib.suppress(OSError):
                if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
                    p.unlink()
        normalize_upper(dest, tuple(lowers))
        yield

    def thaw(self, rec: SandboxRecord) -> None:
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
                qmp.command(
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}],
                )
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

    def save_memory(self, src: SandboxRecord, dest: Path) -> None:
        """Writes a restorable copy of the running `src` to the folder `dest`: its device
        state (`vmstate`), its file-backed RAM (`ram`) and upper disk (`scratch.img`), both
        copied copy-on-write where the filesystem can, and links to its image disks
        (`disks/`). `src` is paused meanwhile and continues after, whatever happened."""
        if not src.extra.get("file_ram"):
            raise RuntimeError_(f"sandbox {src.id} has no file-backed memory (unnamed sandboxes "
                                "have none); give it a name, or copy its filesystem only")  # fmt: skip
        deadline = time.monotonic() + 300
        (dest / "disks").mkdir(parents=True, exist_ok=True)
        with self._connect(src) as exclusive:  # no request of another client is in flight
            exclusive.wait_turn()
            qmp = QMP(str(src.run_path / "qmp.sock"), deadline)
            try:
                qmp.command("stop")
                try:
                    qmp.command(
                        "migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}],
                    )
                    tmp = dest / "vmstate.tmp"
                    qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
                    wait_migration(qmp, deadline)
                    os.replace(tmp, dest / "vmstate")
                    for name in ("ram", "scratch.img"):
                        subprocess.run(["cp", "--reflink=auto", "--sparse=always",
                                        str(src.path / name), str(dest / name)],
                                       check=True, env={"PATH": TOOL_PATH})  # fmt: skip
                finally:
                    qmp.command("cont")  # the original runs on
            finally:
                qmp.close()
        for d in (src.path / "disks").glob("l*.img"):
            _pin(d, dest / "disks" / d.name)

    def start_from_memory(self, dst: SandboxRecord, saved: Path | None = None
                          ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts `dst` from a copy `save_memory` wrote (`saved`, copied into `dst`'s folder
        first; None: it is there already). Returns (pids, extra, confirm) as `start` does."""
        if saved is not None:
            (dst.path / "disks").mkdir(parents=True, exist_ok=True)
            for name in ("vmstate", "ram", "scratch.img"):
                subprocess.run(
                    [
                        "cp",
                        "--reflink=auto",
                        "--sparse=always",
                        str(saved / name),
                        str(dst.path / name),
                    ],
                    check=True,
                    env={"PATH": TOOL_PATH},
                )
            for d in (saved / "disks").glob("l*.img"):
                _pin(d, dst.path / "disks" / d.name)
        disks = sorted((dst.path / "disks").glob("l*.img"), key=lambda p: int(p.stem[1:]))
        accel = dst.extra.get("accel") or "tcg"
        kit = guest_kit(Path(dst.cache_dir) if dst.cache_dir else None)
        argv = qemu_argv(dst, kit, accel, disks, True)
        (dst.path / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
        pids, confirm = self._spawn_shim(dst, argv, None, dst.path / "vmstate", accel)

        def done() -> None:
            confirm()
            with contextlib.suppress(FileNotFoundError):
                (dst.path / "vmstate").unlink()

        return pids, {"file_ram": True}, done

    def clone_memory(self, src: SandboxRecord, dst: SandboxRecord
                     ) -> tuple[dict, dict, Callable[[], None]]:  # fmt: skip
        """Starts `dst` as a copy of the running `src`, memory and devices included (see
        `save_memory`); both continue."""
        self.save_memory(src, dst.path)
        pids, extra, confirm = self.start_from_memory(dst)
        return pids, {**extra, "memory_clone_of": src.id}, confirm

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


def guest_kit(cache: Path | None) -> GuestKit:
    """The executor's provisioned kernel and initramfs (remembered across starts by
    `provision` itself)."""
    return provision(cache)


def qemu_argv(rec: SandboxRecord, kit: GuestKit, accel: str, disks: list[Path],
              file_ram: bool) -> list[str]:  # fmt: skip
    """The sandbox's QEMU command line: its files in the sandbox folder (kept across a
    suspend), its sockets in the run folder, and RAM in <sandbox>/ram when `file_ram`."""
    run = rec.run_path
    return qemu_command(
        kit, accel, memory_mb=rec.memory_mb,
        cpus=max(1, min(math.ceil(rec.cpus), os.cpu_count() or 1)), disks=disks,
        scratch=rec.path / "scratch.img", console=rec.path / "console.log",
        qmp=run / "qmp.sock", ctl=run / "ctl.sock", network=rec.network,
        ram_file=rec.path / "ram" if file_ram else None, boot_init=boots_systemd(rec),
        why="to run microVM sandboxes",
    )  # fmt: skip


INIT_LABEL = "org.tlimage.init"  # tlimage.builder.bases sets it on bases whose init is systemd


def stop_grace(rec: SandboxRecord, accel: str) -> float:
    """How long the shim lets the guest shut itself down before it kills QEMU: the agent's
    sync and reset take well under a second; systemd stops its units first (the agent syncs
    before it asks, so a systemd that takes longer loses no written file when it is killed)."""
    if boots_systemd(rec):
        return 5.0 if accel == "kvm" else 10.0
    return 3.0


def boots_systemd(rec: SandboxRecord) -> bool:
    """Whether the sandbox's image says its init is systemd (the label comes from the catalog
    base and is inherited by every image built FROM it): the microVM then boots it as PID 1."""
    labels = rec.extra.get("image_config", {}).get("labels") or {}
    return labels.get(INIT_LABEL) == "systemd"


# --- client side of the shim -----------------------------------------------------------------


class _Conn:
    """Frames to and from the agent, through the shim (which serves one client at a time)."""

    def __init__(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise RuntimeError_(
                f"cannot reach the sandbox's shim at {path}: {e.strerror}"
            ) from None
        self.chan = Channel(sock)
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
        self.send(P.encode_attach(time.time_ns()))
        f = self.recv(None)
        if f.type is not P.FrameType.HELLO:
            raise P.ProtocolError(f"expected HELLO after ATTACH, got {f.type.name}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.chan.sock.close()


def _ok(c: _Conn, frame, what: str) -> None:  # noqa: ANN001 - a protocol Frame
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
        self.buf += data
        while len(self.buf) >= FRAME_CHUNK:
            self.c.send(P.encode_tar(bytes(self.buf[:FRAME_CHUNK])))
            del self.buf[:FRAME_CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.c.send(P.encode_tar(bytes(self.buf)))
            self.buf.clear()

    def close(self) -> None:
        self.flush()


def _log_tail(rec: SandboxRecord) -> str:
    lines: list[str] = []
    for name in ("shim.log", "qemu.log", "console.log"):
        with contextlib.suppress(OSError):
            lines += (rec.path / name).read_text(errors="replace").strip().splitlines()[-6:]
    return "\n".join("  | " + line for line in lines) or "the shim exited without saying why"
