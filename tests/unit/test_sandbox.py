"""The pieces of tlimage.sandbox that need no namespace: the seccomp profile compiler and its
cache, the capability set, the one isolation rule, the cgroup probe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tlimage.sandbox
import tlimage.sandbox.namespace
from tlimage.sandbox import _init, harden, select_isolation
from tlimage.sandbox.cgroup import missing

pyseccomp = pytest.importorskip("pyseccomp", reason="pyseccomp is not installed")

# linux/capability.h
CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
               "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
               "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18, "CAP_SETFCAP": 31}  # fmt: skip


def test_the_kept_capabilities_are_podmans_default_set_by_name_and_number() -> None:
    assert set(harden.DEFAULT_CAPS) == set(CAP_NUMBERS)
    assert sorted(_init.DEFAULT_CAPS) == sorted(CAP_NUMBERS.values())
    assert sum(1 << n for n in _init.DEFAULT_CAPS) == 0x800405FB  # buildah run's CapEff
    conf = Path("/usr/share/containers/containers.conf")
    if conf.exists():  # the set containers-common ships
        text = conf.read_text()
        listed = text[text.index("default_capabilities") :].split("]")[0]
        assert {f"CAP_{n}" for n in re.findall(r'"([A-Z_]+)"', listed)} == set(CAP_NUMBERS)


def test_masked_and_read_only_paths_are_runcs() -> None:
    assert "/proc/kcore" in _init.MASKED_PATHS and "/sys/firmware" in _init.MASKED_PATHS
    assert len(_init.MASKED_PATHS) == 11
    assert set(_init.READONLY_PATHS) == {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                                         "/proc/sysrq-trigger"}  # fmt: skip


def profile(rule: dict) -> dict:
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                         "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
            "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}, rule]}  # fmt: skip


def compile_(prof: dict, caps: set[str]) -> bytes:
    return harden.compile_profile(prof, caps, "x86_64", pyseccomp)


def test_rules_apply_by_the_capabilities_kept() -> None:
    rule = {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}}
    base = compile_(profile({"names": [], "action": "SCMP_ACT_ALLOW"}), set())
    assert compile_(profile(rule), set(harden.DEFAULT_CAPS)) == base  # SYS_ADMIN is not kept
    assert compile_(profile(rule), {"CAP_SYS_ADMIN"}) != base
    excl = {**rule, "includes": {}, "excludes": {"caps": ["CAP_CHOWN"]}}
    assert compile_(profile(excl), set(harden.DEFAULT_CAPS)) == base
    assert compile_(profile(excl), set()) != base


def test_rules_apply_by_architecture_and_kernel() -> None:
    base = compile_(profile({"names": [], "action": "SCMP_ACT_ALLOW"}), set())
    arm = {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}}
    assert compile_(profile(arm), set()) == base
    amd = {**arm, "includes": {"arches": ["amd64"]}}
    assert compile_(profile(amd), set()) != base
    future = {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}}
    assert compile_(profile(future), set()) == base


def test_the_filter_is_cached_by_the_profiles_bytes(tmp_path: Path, monkeypatch) -> None:
    prof = tmp_path / "seccomp.json"
    import json

    prof.write_text(json.dumps(profile({"names": ["mount"], "action": "SCMP_ACT_ALLOW"})))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(harden.PROFILE_ENV, str(prof))
    monkeypatch.setattr(harden, "_memo", {})
    first = harden.seccomp_bpf()
    assert first and len(first) % 8 == 0  # struct sock_filter is 8 bytes
    cached = list((tmp_path / "cache").rglob("*.bpf"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    monkeypatch.setattr(harden, "_memo", {})
    assert harden.seccomp_bpf() == first
    prof.write_text(json.dumps(profile({"names": ["umount2"], "action": "SCMP_ACT_ALLOW"})))
    assert harden.seccomp_bpf() != first  # a new profile is a new key
    monkeypatch.setenv(harden.PROFILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(harden.Unavailable, match="containers-common"):
        harden.seccomp_bpf()


def test_the_real_profile_compiles() -> None:
    if not harden.PROFILE.exists():
        pytest.skip("containers-common is not installed (scripts/setup.sh installs it)")
    bpf = harden.seccomp_bpf()
    assert len(bpf) > 1000 and len(bpf) % 8 == 0


def test_one_rule_for_auto(monkeypatch) -> None:
    ns = tlimage.sandbox.namespace
    monkeypatch.setenv("TLIMAGE_NOTICES", "always")
    notes: list[str] = []
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    monkeypatch.setattr(ns, "check_host", lambda: None)
    monkeypatch.setattr(ns, "missing_layers", lambda: [])
    assert select_isolation("auto", kvm_probe=lambda: (True, "ok"), notice=notes.append) == (
        "microvm",
        "kvm",
    )
    assert notes == []
    assert select_isolation("auto", kvm_probe=lambda: (False, "no kvm"),
                            notice=notes.append) == ("namespace", None)  # fmt: skip
    assert len(notes) == 1 and "no kvm" in notes[0]
    assert select_isolation("auto", kvm_probe=lambda: (False, "no kvm"),
                            notice=notes.append) == ("namespace", None)  # fmt: skip
    assert len(notes) == 1  # said once per process
    # A missing layer: auto keeps isolation (the microVM), and says which layer.
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    monkeypatch.setattr(ns, "missing_layers", lambda: ["no seccomp library"])
    assert select_isolation("auto", kvm_probe=lambda: (False, "no kvm"),
                            notice=notes.append) == ("microvm", "tcg")  # fmt: skip
    assert "no seccomp library" in notes[-1] and "namespace-unsafe" in notes[-1]
    # The explicit opt-in says what it runs without, once.
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    for _ in range(2):
        assert select_isolation("namespace-unsafe", kvm_probe=lambda: (False, ""),
                                notice=notes.append) == ("namespace-unsafe", None)  # fmt: skip
    assert notes[-1].startswith("namespace-unsafe") and "no seccomp library" in notes[-1]
    assert sum("namespace-unsafe:" in n for n in notes) == 1


def test_explicit_namespace_refuses_a_missing_layer(monkeypatch) -> None:
    monkeypatch.setattr(tlimage.sandbox.namespace, "missing_layers", lambda: ["no pids"])
    with pytest.raises(tlimage.sandbox.namespace.SandboxError,
                       match="no pids.*namespace-unsafe"):  # fmt: skip
        tlimage.sandbox.namespace._seccomp(False)


def test_cgroups_off_is_a_missing_layer(monkeypatch) -> None:
    monkeypatch.setenv("TLIMAGE_CGROUPS", "0")
    assert missing() and "TLIMAGE_CGROUPS=0" in missing()[0]


def test_paths_made_before_pivot_are_seen_from_inside() -> None:
    assert _init.inside("/x/merged", "/x/merged/etc/hosts") == "/etc/hosts"
    assert _init.inside("/x/merged", "/x/merged") == "/"


def test_id_range_takes_a_tlimage_entry_of_subuid_and_subgid(tmp_path) -> None:  # noqa: ANN001
    from tlimage.sandbox.namespace import DEFAULT_ID_BASE, DEFAULT_ID_COUNT, id_range

    default = (DEFAULT_ID_BASE, DEFAULT_ID_BASE, DEFAULT_ID_COUNT)

    uid, gid = tmp_path / "subuid", tmp_path / "subgid"
    files = (str(uid), str(gid))
    assert id_range(files) == default  # no files
    assert DEFAULT_ID_BASE + DEFAULT_ID_COUNT - 1 == 2**32 - 3  # (uid_t)-2 and -1 stay out
    uid.write_text("alice:100000:65536\ntlimage:300000:65536\n")
    gid.write_text("tlimage:400000:70000\n")
    assert id_range(files) == (300000, 400000, 65536)  # the smaller count
    gid.write_text("tlimage:400000:1000\n")  # too few ids for 0..65535: the default range
    assert id_range(files) == default
    gid.write_text("tlimage:junk\n")
    assert id_range(files) == default


def test_userns_can_be_turned_off_and_the_notice_names_what_is_lost(monkeypatch) -> None:  # noqa: ANN001
    from tlimage.sandbox import namespace

    monkeypatch.setenv(namespace.USERNS_ENV, "0")
    assert namespace.idmap() is None
    text = namespace.userns_notice()
    assert text is not None and "TLIMAGE_USERNS=0" in text and "host's root" in text
