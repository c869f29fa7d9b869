"""Isolation for build steps and sandboxes: the one place for namespace sandboxes (and, in
`qemu/`, the microVM machinery), below the executor and the runtime.

    select_isolation(requested, kvm_probe=...) -> ("microvm", "kvm" | "tcg" | None)
                                                | ("namespace" | "namespace-unsafe", None)
    namespace.py   host side: start a build step or a long-lived sandbox, enter one
    _init.py       PID 1 inside (standalone, stdlib only)
    _enter.py      exec / cp helper that joins a running sandbox (standalone)
    cgroup.py      a sandbox's cgroup: limits, freezing, finding every process
    proc.py        processes tracked by (pid, start time, boot id)
    network.py     a sandbox's network: slirp4netns + nft rules in its own network namespace
    backend.py     the Backend protocol of the runtime's sandboxes; fake.py, one for unit tests
    upper.py       overlay-style uppers: normalize_upper, apply_upper
    qemu/          the microVM: guest kit, disk images, QEMU process, QMP, agent channel,
                   KVM probe, the sandbox shim (qemu/__init__.py lists them)
    harden.py      the capability set and the seccomp filter (libseccomp, containers-common)
    stray.py       running sandboxes found from their processes (whose state folder, cgroups)

Importing this package starts nothing and imports nothing above it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

KvmProbe = Callable[[], tuple[bool, str]]
_noticed = False


def _default_notice(msg: str) -> None:
    print(f"tlimage: {msg}", file=sys.stderr)


def select_isolation(requested: str, *, kvm_probe: KvmProbe,
                     notice: Callable[[str], None] | None = None) -> tuple[str, str | None]:  # fmt: skip
    """(backend, accel) for `requested` ("auto", "microvm", "namespace" or
    "namespace-unsafe"); accel is None unless `auto` decided it. The rule for build steps and
    sandboxes alike: the microVM when KVM boots (`kvm_probe()`), else the namespace sandbox
    when this host gives it every layer of isolation, else the microVM under TCG. Fallbacks,
    and the layers `namespace-unsafe` runs without, are said once per process."""
    global _noticed
    say = notice or _default_notice
    if requested == "namespace-unsafe":
        from tlimage.sandbox.namespace import missing_layers

        lack = missing_layers()
        _userns_notice(say)
        if lack and not _noticed:
            say("namespace-unsafe: build steps and sandboxes run without "
                + "; ".join(lack))  # fmt: skip
            _noticed = True
        return requested, None
    if requested != "auto":
        if requested == "namespace":
            _userns_notice(say)
        return requested, None
    ok, reason = kvm_probe()
    if ok:
        return "microvm", "kvm"
    from tlimage.sandbox.namespace import check_host, missing_layers

    problem = check_host()
    lack = missing_layers() if problem is None else []
    if lack and not _noticed:  # never silently weaker: the missing layers are named
        from tlimage.notices import once, short_reason

        once("namespace-layers", "; ".join(lack),
             f"KVM is not usable ({short_reason(reason)}) and namespace isolation here would "
             f"lack: {'; '.join(lack)}; build steps and sandboxes run in a microVM under TCG "
             "(slow; --isolation namespace-unsafe runs them in namespaces anyway)", say)  # fmt: skip
        _noticed = True
    if problem is None and not lack:
        if not _noticed:  # once per process, and once per machine state (tlimage.notices)
            from tlimage.notices import kvm_fallback

            kvm_fallback(reason, "build steps and sandboxes", "a namespace sandbox", say)
            _noticed = True
        _userns_notice(say)
        return "namespace", None
    if not _noticed:
        from tlimage.notices import kvm_fallback

        kvm_fallback(f"{reason}; {problem}", "build steps and sandboxes",
                     "a microVM under TCG (slow)", say)  # fmt: skip
        _noticed = True
    return "microvm", "tcg"


def _userns_notice(say: Callable[[str], None]) -> None:
    """A kernel that cannot give sandboxes a user namespace is said once per machine state,
    naming what is lost; it is no refusal (runc's default has no user namespace either)."""
    from tlimage.sandbox.namespace import userns_notice

    text = userns_notice()
    if text:
        from tlimage.notices import once

        once("namespace-userns", text, text, say)


__all__ = ["KvmProbe", "select_isolation"]
