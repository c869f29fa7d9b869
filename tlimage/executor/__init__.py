"""Executors run one build step on a stack of layers and return what it changed.

    select_executor("auto" | "microvm" | "namespace" | "namespace-unsafe" | "fake") -> Executor

Backends (imported lazily; importing this package starts nothing):
    microvm    QEMU -M microvm; KVM when a boot probe passes, TCG otherwise   (microvm.py)
    namespace  unshare + overlayfs + chroot, no VM; needs root               (namespace.py)
    fake       in-process, for unit tests                                    (fake.py)

`auto` follows tlimage.sandbox.select_isolation (the rule sandboxes follow too): the microVM
when KVM works; otherwise the namespace sandbox, said once per process through `notice`; a host
that can do neither namespaces nor KVM gets the microVM under TCG (slow but isolated).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tlimage.executor.base import (
    Executor,
    OutputCallback,
    RunRequest,
    RunResult,
    StepTimeout,
)

ISOLATIONS = ("auto", "microvm", "namespace", "namespace-unsafe", "fake")


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
    if isolation in ("namespace", "namespace-unsafe"):
        from tlimage.executor.namespace import NamespaceExecutor
        from tlimage.sandbox import select_isolation

        select_isolation(isolation, kvm_probe=lambda: (False, ""), notice=notice)
        return NamespaceExecutor(unsafe=isolation == "namespace-unsafe")
    from tlimage.executor.microvm import MicroVMExecutor

    if isolation == "microvm":
        return MicroVMExecutor(cache_dir=cache_dir, progress=progress)

    # auto
    from tlimage.sandbox import select_isolation
    from tlimage.sandbox.qemu.kvm import kvm_usable

    backend, accel = select_isolation(
        "auto", kvm_probe=lambda: kvm_usable(cache_dir, progress), notice=notice
    )
    if backend == "namespace":
        from tlimage.executor.namespace import NamespaceExecutor

        return NamespaceExecutor()
    return MicroVMExecutor(cache_dir=cache_dir, accel=accel, progress=progress)


__all__ = [
    "ISOLATIONS",
    "Executor",
    "OutputCallback",
    "RunRequest",
    "RunResult",
    "StepTimeout",
    "select_executor",
]
