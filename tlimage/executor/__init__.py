"""Executors run one build step on a stack of layers and return what it changed.

    select_executor("auto" | "microvm" | "namespace" | "fake") -> Executor

Backends (imported lazily; importing this package starts nothing):
    microvm    QEMU -M microvm; KVM when a boot probe passes, TCG otherwise   (microvm.py)
    namespace  unshare + overlayfs + chroot, no VM; needs root               (namespace.py)
    fake       in-process, for unit tests                                    (fake.py)

`auto` follows tlimage.sandbox.select_isolation (the rule sandboxes follow too): the microVM
when KVM works; otherwise the namespace sandbox, said once per process through `notice`; a host
that can do neither namespaces nor KVM gets the microVM under TCG (slow but isolated).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tlimage.executor.base import (
    Executor,
    OutputCallback,
    RunRequest,
    RunResult,
    StepTimeout,
)

ISOLATIONS = ("auto", "microvm", "namespace", "fake")


def select_executor(
    isolation: str = "auto",
    *,
    cache_dir: Path | None = None,
    notice: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Executor:
    from tlimage.errors import ExecutorError

    if isolation not in ISOLATIONS:
        raise ExecutorError(
            f"unknown isolation {isolation!r}; expected one of: {', '.join(ISOLATIONS)}"
        )
    if isolation == "fake":
        from tlimage.executor.fake import FakeExecutor

        return FakeExecutor()
    if isolation == "namespace":
        from tlimage.executor.namespace import NamespaceExecutor

        return NamespaceExecutor()
    from tlimage.executor.microvm import MicroVMExecutor

    if isolation == "microvm":
        return MicroVMExecutor(cache_dir=cache_dir, progress=progress)

    # auto
    from tlimage.sandbox import select_isolation

    backend, accel = select_isolation(
        "auto", kvm_probe=lambda: kvm_usable(cache_dir, progress), notice=notice)
    if backend == "namespace":
        from tlimage.executor.namespace import NamespaceExecutor

        return NamespaceExecutor()
    return MicroVMExecutor(cache_dir=cache_dir, accel=accel, progress=progress)


def kvm_usable(cache_dir: Path | None, progress=None) -> tuple[bool, str]:  # noqa: ANN001
    """Cheap checks first; the boot probe (which provisions the guest kit) only when /dev/kvm
    could work at all."""
    forced = os.environ.get("TLIMAGE_KVM")
    if forced == "0":
        return False, "TLIMAGE_KVM=0"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    from tlimage.errors import ExecutorError
    from tlimage.executor.microvm import probe_kvm
    from tlimage.executor.provision import provision

    try:
        kit = provision(cache_dir, progress=progress)
    except ExecutorError as e:
        return False, f"cannot provision the guest kernel: {e}"
    usable, reason = probe_kvm(kit, cache_dir)
    return usable, reason


__all__ = [
    "ISOLATIONS",
    "Executor",
    "OutputCallback",
    "RunRequest",
    "RunResult",
    "StepTimeout",
    "kvm_usable",
    "select_executor",
]
