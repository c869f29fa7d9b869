"""What a namespace sandbox is hardened with, decided on the host: the capability set every
process keeps, and the seccomp filter they run under.

The filter is the default profile that Debian's `containers-common` ships for podman and
buildah (/usr/share/containers/seccomp.json, the Docker/moby profile in OCI form), compiled by
libseccomp (through `pyseccomp`, a ctypes binding with libseccomp's own Python API) for this
machine's architecture and its sub-architectures, honouring the profile's conditions: a rule
`includes`/`excludes` capabilities (judged against the capabilities we keep), architectures
and a minimum kernel. The exported BPF is cached on disk, keyed by the profile's bytes, the
architecture, the kernel release and libseccomp's version; PID 1 and the exec helper install
it with prctl(PR_SET_SECCOMP) as their last step before execve (see _init.load_seccomp).

`missing_layers()` in namespace.py names each layer this host cannot provide; callers refuse to run without it
unless the user opted in to weaker isolation.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

from tlimage._fs import write_atomic

PROFILE = Path("/usr/share/containers/seccomp.json")
PROFILE_ENV = "TLIMAGE_SECCOMP_PROFILE"  # another profile in the same format (tests, distros)
# podman's and buildah's default capability set (containers-common's containers.conf), which
# is Docker's default set without NET_RAW, MKNOD and AUDIT_WRITE; _init.DEFAULT_CAPS by number.
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_SETFCAP")  # fmt: skip
# The OCI profile's architecture names, as Go spells them, for platform.machine().
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip
_SCMP_ARCH = {"SCMP_ARCH_X86_64": "X86_64", "SCMP_ARCH_X86": "X86", "SCMP_ARCH_X32": "X32",
              "SCMP_ARCH_AARCH64": "AARCH64", "SCMP_ARCH_ARM": "ARM",
              "SCMP_ARCH_PPC64LE": "PPC64LE", "SCMP_ARCH_S390X": "S390X",
              "SCMP_ARCH_S390": "S390", "SCMP_ARCH_RISCV64": "RISCV64"}  # fmt: skip
_NATIVE_SCMP = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64",
                "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X",
                "riscv64": "SCMP_ARCH_RISCV64"}  # fmt: skip
# Go-style names in `arches` conditions for each libseccomp architecture we add.
_ARCH_GO = {"X86_64": "amd64", "X86": "x86", "X32": "x32", "AARCH64": "arm64", "ARM": "arm",
            "PPC64LE": "ppc64le", "S390X": "s390x", "S390": "s390", "RISCV64": "riscv64"}  # fmt: skip


class Unavailable(Exception):
    """A layer of isolation this host cannot provide; the message says which and why."""


_memo: dict[tuple[str, ...], bytes] = {}


def seccomp_bpf(caps: tuple[str, ...] = DEFAULT_CAPS) -> bytes:
    """The compiled default profile for processes that keep `caps` (BPF bytes, from the disk
    cache when it has them)."""
    path = Path(os.environ.get(PROFILE_ENV) or PROFILE)
    try:
        profile = path.read_bytes()
    except OSError as e:
        raise Unavailable(f"no seccomp profile at {path} ({e.strerror}; "
                          "apt-get install containers-common)") from None  # fmt: skip
    try:
        import pyseccomp
    except ImportError:
        raise Unavailable("the seccomp library is missing (pip install pyseccomp; "
                          "apt-get install libseccomp2)") from None  # fmt: skip
    except OSError as e:  # the binding found no libseccomp.so
        raise Unavailable(
            f"libseccomp cannot be loaded ({e}; apt-get install libseccomp2)"
        ) from None
    machine = platform.machine()
    key = hashlib.sha256(json.dumps([
        profile.hex(), machine, platform.release(), _libseccomp_version(), sorted(caps),
        getattr(pyseccomp, "__version__", "")]).encode()).hexdigest()[:32]  # fmt: skip
    if key in _memo:
        return _memo[key]
    cached = cache_dir() / f"{key}.bpf"
    with contextlib.suppress(OSError):
        data = cached.read_bytes()
        if data and len(data) % 8 == 0:
            _memo[key] = data
            return data
    data = compile_profile(json.loads(profile), set(caps), machine, pyseccomp)
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, data, durable=False)
    _memo[key] = data
    return data


def compile_profile(profile: dict, caps: set[str], machine: str, lib) -> bytes:  # noqa: ANN001
    """The OCI seccomp `profile` as BPF for `machine`, for processes holding `caps`."""
    action = _action(lib, profile.get("defaultAction", "SCMP_ACT_ERRNO"),
                     profile.get("defaultErrnoRet"))  # fmt: skip
    f = lib.SyscallFilter(action)
    native = _NATIVE_SCMP.get(machine)
    arches = ["X86_64" if native is None else _SCMP_ARCH[native]]
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == native:
            arches += [_SCMP_ARCH[a] for a in entry.get("subArchitectures") or []
                       if a in _SCMP_ARCH]  # fmt: skip
    for a in arches[1:]:
        with contextlib.suppress(Exception):
            f.add_arch(getattr(lib.Arch, a))
    go_arches = {_ARCH_GO[a] for a in arches}
    kernel = _kernel_version()
    for rule in profile.get("syscalls") or []:
        if not _applies(rule, caps, go_arches, kernel):
            continue
        act = _action(lib, rule["action"], rule.get("errnoRet"))
        args = [lib.Arg(a["index"], getattr(lib, a["op"].removeprefix("SCMP_CMP_")),
                        a.get("value", 0), a.get("valueTwo", 0))
                for a in rule.get("args") or []]  # fmt: skip
        for name in rule.get("names") or ([rule["name"]] if rule.get("name") else []):
            with contextlib.suppress(Exception):  # a syscall this architecture lacks
                f.add_rule(act, name, *args)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def _applies(rule: dict, caps: set[str], arches: set[str], kernel: tuple[int, ...]) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    if inc.get("arches") and not set(inc["arches"]) & arches:
        return False
    if exc.get("arches") and set(exc["arches"]) & arches:
        return False
    if inc.get("minKernel") and kernel < _version(inc["minKernel"]):
        return False
    return True


def _action(lib, name: str, errno: int | None) -> int:  # noqa: ANN001
    if name == "SCMP_ACT_ERRNO":
        return lib.ERRNO(1 if errno is None else int(errno))
    if name == "SCMP_ACT_TRACE":
        return lib.TRACE(1 if errno is None else int(errno))
    simple = {"SCMP_ACT_ALLOW": "ALLOW", "SCMP_ACT_KILL": "KILL",
              "SCMP_ACT_KILL_THREAD": "KILL_THREAD", "SCMP_ACT_KILL_PROCESS": "KILL_PROCESS",
              "SCMP_ACT_TRAP": "TRAP", "SCMP_ACT_LOG": "LOG"}  # fmt: skip
    return getattr(lib, simple[name])


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _kernel_version() -> tuple[int, ...]:
    return _version(platform.release().split("-")[0])


@functools.cache
def _libseccomp_version() -> str:
    """The loaded library's version, once per process (a dlopen each time was ~2 ms of every
    sandbox start)."""

    class V(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
        lib.seccomp_version.restype = ctypes.POINTER(V)
        v = lib.seccomp_version().contents
        return f"{v.major}.{v.minor}.{v.micro}"
    except (OSError, AttributeError):
        return "unknown"


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "tlimage" / "seccomp-v1"
