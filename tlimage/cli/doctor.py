"""`tl sbx doctor`: what this machine can do, with the details the one-line notices leave out."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "ok", "warn", "missing"


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def kvm(cache_dir: Path | None) -> dict[str, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return _check("kvm", FAIL, "/dev/kvm is missing or not accessible: microVMs run under "
                      "TCG emulation (slow); `auto` uses the namespace backend")  # fmt: skip
    from tlimage.sandbox.qemu.kvm import kvm_usable  # the probe result is cached per machine state

    ok, reason = kvm_usable(cache_dir, None)
    if ok:
        return _check("kvm", OK, "a microVM boots with KVM")
    return _check("kvm", WARN, f"/dev/kvm exists but the boot probe failed: {reason}")


def cgroups() -> dict[str, str]:
    root = Path("/sys/fs/cgroup")
    ctl = root / "cgroup.controllers"
    if not ctl.is_file():
        v1 = [c for c in ("cpu", "memory", "freezer", "pids") if (root / c).is_dir()]
        if v1:
            return _check("cgroups", OK, "cgroup v1: " + " ".join(v1))
        return _check("cgroups", WARN, "no cgroup hierarchy at /sys/fs/cgroup: --cpus and "
                      "--memory are not enforced in namespace sandboxes")  # fmt: skip
    have = ctl.read_text().split()
    missing = [c for c in ("cpu", "memory", "pids") if c not in have]
    if missing:
        return _check("cgroups", WARN, f"cgroup v2 without {', '.join(missing)}")
    return _check("cgroups", OK, "cgroup v2: " + " ".join(have))


def user_namespaces() -> dict[str, str]:
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = -1
    unshare = shutil.which("unshare")
    if unshare is None:
        return _check("user namespaces", FAIL, "`unshare` is not installed (util-linux)")
    p = subprocess.run([unshare, "--user", "--map-root-user", "true"], capture_output=True,
                       text=True, check=False)  # fmt: skip
    if p.returncode == 0:
        from tlimage.sandbox.namespace import id_range, userns_notice

        lost = userns_notice()
        if lost:
            return _check("user namespaces", WARN, lost)
        uid, gid, count = id_range()
        return _check("user namespaces", OK, f"available (max {limit}); build steps and "
                      f"sandboxes map root to host uid {uid}, gid {gid} ({count} ids), layers "
                      "keep their ids through idmapped mounts")  # fmt: skip
    return _check(
        "user namespaces", WARN, f"unshare --user failed: {p.stderr.strip()[:120]} (max {limit})"
    )


def seccomp() -> dict[str, str]:
    mode = ""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Seccomp:"):
                mode = line.split()[1]
    except OSError:
        pass
    if not mode:
        return _check("seccomp", FAIL, "the kernel does not report seccomp support")
    try:
        import pyseccomp as _  # noqa: F401

        lib = "libseccomp Python binding present"
    except ImportError:
        lib = "no libseccomp Python binding (pip install pyseccomp)"
    return _check("seccomp", OK if "present" in lib else WARN, f"kernel filter mode {mode}; {lib}")


def network_helper() -> dict[str, str]:
    found = [t for t in ("pasta", "slirp4netns") if shutil.which(t)]
    if found:
        return _check("network helper", OK, ", ".join(found))
    return _check("network helper", WARN, "neither pasta (passt) nor slirp4netns is installed")


def namespace_backend() -> dict[str, str]:
    from tlimage.executor.namespace import check_host

    problem = check_host()
    return _check("namespace backend", FAIL if problem else OK, problem or "usable")


def base_images(cache_dir: Path | None) -> dict[str, str]:
    from tlimage.executor import bases, catalog

    built = [s.name for s in catalog.CATALOG if bases.built_tree(s.name, cache_dir) is not None]
    tool = shutil.which("mmdebstrap")
    detail = (f"default {catalog.default_base()}; built: {', '.join(built) or 'none'}"
              + ("" if tool else "; mmdebstrap is missing, so no Debian/Ubuntu base can be "
                 "built"))  # fmt: skip
    return _check("base images", OK if tool else WARN, detail)


def cache_size(cache_dir: Path | None) -> dict[str, str]:
    from tlimage.cache.cache import LayerCache
    from tlimage.cli.render import size

    with LayerCache(cache_dir) as c:
        u = c.usage()
        root = c.root
    return _check("cache", OK, f"{size(u.bytes)} in {u.blobs} layers ({u.entries} entries) "
                  f"at {root}")  # fmt: skip


def _stray_text(s: Any) -> str:
    where = "folder removed" if not s.folder_exists else "no record"
    cg = f", {len(s.cgroups)} cgroups" if s.cgroups else ""
    return f"{s.sandbox_id} ({s.backend}, pid {s.process[0]}, {where}{cg})"


def stray_sandboxes(fix: bool = False) -> dict[str, Any]:
    """Sandboxes of this state folder that run with no record (nothing can reach them to
    terminate them); `fix` ends them and removes their cgroups."""
    from tlimage._paths import state_dir
    from tlimage.runtime import end_stray_sandboxes, stray_sandboxes

    where = state_dir()
    if fix:
        ended = end_stray_sandboxes()
        if not ended:
            return {**_check("stray sandboxes", OK, f"none of {where}"), "sandboxes": []}
        left = [s for s, gone in ended if not gone]
        text = "ended " + ", ".join(_stray_text(s) for s, _ in ended)
        if left:
            text += "; still there: " + ", ".join(s.sandbox_id for s in left)
        return {**_check("stray sandboxes", WARN if left else OK, text),
                "sandboxes": [{**s.to_json(), "ended": gone} for s, gone in ended]}  # fmt: skip
    found = stray_sandboxes()
    if not found:
        return {**_check("stray sandboxes", OK, f"none of {where}"), "sandboxes": []}
    text = (f"{len(found)} of {where} run with no record, so no command reaches them: "
            + ", ".join(_stray_text(s) for s in found)
            + "; `tl sbx doctor --fix` ends them and removes their cgroups")  # fmt: skip
    return {**_check("stray sandboxes", WARN, text), "sandboxes": [s.to_json() for s in found]}


def run(cache_dir: Path | None, fix: bool = False) -> list[dict[str, Any]]:
    checks = []
    for fn in (kvm, cgroups, user_namespaces, seccomp, network_helper, namespace_backend,
               base_images, cache_size, stray_sandboxes):  # fmt: skip
        try:
            if fn in (kvm, base_images, cache_size):
                checks.append(fn(cache_dir))
            elif fn is stray_sandboxes:
                checks.append(fn(fix))
            else:
                checks.append(fn())
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            checks.append(_check(fn.__name__.replace("_", " "), WARN, f"check failed: {e}"))
    return checks
