"""Whether KVM works here: a real boot probe, its result cached per host kernel, QEMU and guest
kit in `<cache>/executor-v1/kvm-probe.json`. Some hosts expose a /dev/kvm that cannot run a
stock guest kernel, so the presence of /dev/kvm proves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tlimage import _layout
from tlimage._fs import write_atomic
from tlimage.errors import ExecutorError
from tlimage.sandbox.qemu.process import VM, BootError
from tlimage.sandbox.qemu.provision import GuestKit, bucket_dir, provision, require_tool

KVM_PROBE_TIMEOUT = 10.0


def _qemu_version() -> str:
    qemu = require_tool("qemu-system-x86_64", "to run build steps in a microVM")
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def probe_kvm(
    kit: GuestKit,
    cache_dir: Path | None = None,
    *,
    timeout: float = KVM_PROBE_TIMEOUT,
    refresh: bool = False,
) -> tuple[bool, str]:
    """(usable, reason). Boots the real guest with -accel kvm; usable only if the agent answers
    within `timeout` and QMP confirms KVM is on. Cached in executor-v1/kvm-probe.json keyed by
    the host kernel, QEMU version and guest kit. `TLIMAGE_KVM=0|1` overrides without probing."""
    forced = os.environ.get("TLIMAGE_KVM")
    if forced in ("0", "1"):
        return forced == "1", f"TLIMAGE_KVM={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    key = f"{os.uname().release}|{_qemu_version()}|{kit.key}"
    path = bucket_dir(_layout.KVM_PROBE, cache_dir)
    cache: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if not refresh and key in cache:
        entry = cache[key]
        return bool(entry["usable"]), entry["reason"] + " (cached)"
    vm = VM(kit, "kvm", [], network=False, memory_mb=256, cpus=1, scratch_size=64 << 20)
    t0 = time.monotonic()
    try:
        vm.start(timeout)
        enabled = vm.qmp.command("query-kvm").get("enabled", False) if vm.qmp else True
        usable = bool(enabled)
        reason = (
            f"booted with KVM in {time.monotonic() - t0:.2f} s"
            if usable
            else "QEMU reports KVM not enabled"
        )
    except BootError as e:
        usable, reason = (
            False,
            str(e).splitlines()[0]
            + "; "
            + " / ".join(line.strip(" |") for line in str(e).splitlines()[1:3]),
        )
    finally:
        vm.shutdown()
    cache[key] = {"usable": usable, "reason": reason, "at": int(time.time())}
    write_atomic(path, json.dumps(cache, indent=2) + "\n", durable=False)
    return usable, reason


def kvm_usable(cache_dir: Path | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[bool, str]:  # fmt: skip
    """Cheap checks first; the boot probe (which provisions the guest kit) only when /dev/kvm
    could work at all."""
    forced = os.environ.get("TLIMAGE_KVM")
    if forced == "0":
        return False, "TLIMAGE_KVM=0"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    try:
        kit = provision(cache_dir, progress=progress)
    except ExecutorError as e:
        return False, f"cannot provision the guest kernel: {e}"
    usable, reason = probe_kvm(kit, cache_dir)
    return usable, reason
