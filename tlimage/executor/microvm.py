"""MicroVM executor: each step runs in a throwaway QEMU `-M microvm` guest.

    host                                        guest (runner/init, runner/agent.c)
    lower dirs --mke2fs -d--> ext4 images  -->  /dev/vdX (serial tl-l<N>), mounted ro
    sparse ext4 scratch image              -->  /dev/vdY (serial tl-scratch): uppers, work dirs
    unix socket <---- virtio-serial "tl.ctl" ---> agent: MOUNT, RUN (streams), EXPORT (tar), ...
    QMP unix socket                             (quit, query-kvm)

The VM itself (QEMU's command line and process, QMP, the agent channel, the ext4 images, the
KVM probe) is tlimage.sandbox.qemu; this module is the build-step side: which disks a step
needs, the agent requests that run it, and the warm VM between steps.

Acceleration: KVM only when a real boot probe reaches the agent within a short timeout
(sandbox/qemu/kvm.py); otherwise TCG.

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
import json
import os
import shlex
import shutil
import stat
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from tlimage.errors import ExecutorError
from tlimage.executor.base import (
    HostMount,
    OutputCallback,
    RunRequest,
    RunResult,
    StepTimeout,
)
from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu.channel import TarFrames, apply_export_end, unpack_export
from tlimage.sandbox.qemu.disks import (
    MAX_DISKS,
    MAX_LOWER_DISKS,
    flatten_layers,
    lower_images,
    make_ext4,
    tree_key,
)
from tlimage.sandbox.qemu.kvm import probe_kvm
from tlimage.sandbox.qemu.process import DEFAULT_MEMORY_MB, VM, console_tail
from tlimage.sandbox.qemu.provision import provision, require_tool
from tlimage.sandbox.upper import OPAQUE_XATTR, apply_upper, normalize_upper, walk, xattrs

TCG_BOOT_TIMEOUT = 120.0
KVM_BOOT_TIMEOUT = 30.0


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
    for rel, st in walk(root):
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
        rec.append(
            [
                (n, v.hex())
                for n, v in xattrs(path)
                if n == OPAQUE_XATTR or n.startswith(("user.", "security.capability"))
            ]
        )
        h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


@dataclass
class _Session:
    """A running VM and what it can serve as lowers without a reboot: its disks (by host path)
    and the uppers of the steps it ran (on the scratch disk, by content key)."""

    vm: VM
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
        self.boot_timeout = boot_timeout or (
            KVM_BOOT_TIMEOUT if accel == "kvm" else TCG_BOOT_TIMEOUT
        )
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
                req, [img for _, img, _ in images if isinstance(img, Path)]
            )
            vm = session.vm
            i = session.steps
            session.steps += 1
            upper = f"/tl/scratch/{i}/upper"
            plan = _plan_mounts(req, images, first, f"/tl/scratch/{i}")
            for overlay in plan.overlays:  # before the root: RUN runs in the last MOUNT's target
                vm.request(P.encode_mount(overlay))
            vm.request(
                P.encode_mount(
                    P.MountRequest(tuple(guest_lowers), upper, f"/tl/scratch/{i}/work", "/tl/root")
                )
            )
            try:
                for bind in plan.binds:
                    vm.request(P.encode_bind(bind))
            except ExecutorError as e:
                raise ExecutorError(
                    f"step could not start: RUN --mount: "
                    f"{str(e).removeprefix('guest agent: BIND: ')}"
                ) from None
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
        if (
            not extra
            and s is not None
            and s.vm.proc is not None
            and s.vm.proc.poll() is None
            and s.network == req.network
        ):
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
        vm = VM(self.kit, self.accel, [*disks, *extra], req.network, self.memory_mb, self.cpus)
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

    def _run_step(self, vm: VM, req: RunRequest, emit: OutputCallback,
                  secret_env: tuple[bytes, ...] = ()) -> int:  # fmt: skip
        assert vm.chan is not None
        deadline = None if req.timeout is None else time.monotonic() + req.timeout
        env = (*req.env_list(), *secret_env)  # the channel is private: no log, no argv
        vm.chan.send(
            P.encode_run(P.RunRequestMsg(req.argv, env, req.user, req.workdir, req.network))
        )  # type: ignore[arg-type]
        while True:
            try:
                f = vm.chan.recv(deadline)
            except TimeoutError:
                raise StepTimeout(
                    f"step timed out after {req.timeout:g} s: {shlex.join(req.argv)}"
                ) from None
            except EOFError:
                raise ExecutorError("the microVM died during the step" + console_tail(vm)) from None
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

    def _export(self, vm: VM, guest_upper: str, req: RunRequest) -> tuple[str, ...]:
        self._export_to(vm, guest_upper, req.upper_dir)
        return normalize_upper(req.upper_dir, req.lowers)

    def _export_to(self, vm: VM, guest_upper: str, dest: Path) -> None:
        assert vm.chan is not None
        vm.chan.send(P.encode_export(guest_upper))
        stream = TarFrames(vm.chan, time.monotonic() + 600)
        unpack_export(stream, dest)
        end = stream.finish()  # tar's end-of-archive padding may leave frames unread
        if end.type is P.FrameType.ERROR:
            raise ExecutorError(f"exporting the step's changes failed: {P.decode_error(end)}")
        if end.type is not P.FrameType.EXPORT_END:
            raise P.ProtocolError(f"unexpected {end.type.name} frame during EXPORT")
        apply_export_end(dest, P.decode_export_end(end))

    def _write_back(self, vm: VM, guest_upper: str, dest: Path, scratch: Path) -> None:
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
        if (
            s is None
            or s.vm.proc is None
            or s.vm.proc.poll() is not None
            or s.network != req.network
            or s.guest_lowers(req.lowers) is None
        ):
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
