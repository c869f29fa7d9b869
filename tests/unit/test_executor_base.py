"""Executor pieces that need no VM: the request type, the fake, upper normalisation, export
unpacking, layer flattening, provisioning helpers and base-builder errors."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tlimage.errors import ExecutorError, TlimageError
from tlimage.executor import ISOLATIONS, select_executor
from tlimage.executor.base import DEFAULT_PATH, Executor, RunRequest
from tlimage.executor.bases import BaseError, _is_static_elf, ensure_base
from tlimage.executor.fake import FakeExecutor
from tlimage.sandbox.qemu.provision import (
    ProvisionError,
    _cpio_entry,
    build_initramfs,
    require_tool,
    resolve_modules,
)
from tlimage.sandbox.upper import normalize_upper

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted xattrs)")


def req(tmp_path, *argv, **kw) -> RunRequest:
    return RunRequest(lowers=(tmp_path,), argv=argv, upper_dir=tmp_path / "upper", **kw)


# --- RunRequest ------------------------------------------------------------------------------


def test_run_request_validates(tmp_path):
    with pytest.raises(ExecutorError, match="at least one lower"):
        RunRequest(lowers=(), argv=("true",), upper_dir=tmp_path / "u")
    with pytest.raises(ExecutorError, match="non-empty argv"):
        RunRequest(lowers=(tmp_path,), argv=(), upper_dir=tmp_path / "u")
    with pytest.raises(ExecutorError, match="workdir must be absolute"):
        RunRequest(lowers=(tmp_path,), argv=("true",), upper_dir=tmp_path / "u", workdir="x")


def test_env_list_adds_default_path_only_when_missing(tmp_path):
    assert req(tmp_path, "true", env=(("A", "1"),)).env_list() == [f"PATH={DEFAULT_PATH}", "A=1"]
    assert req(tmp_path, "true", env=(("PATH", "/x"),)).env_list() == ["PATH=/x"]


# --- fake ------------------------------------------------------------------------------------


def test_fake_executor_records_and_writes_upper(tmp_path):
    ex = FakeExecutor()
    assert isinstance(ex, Executor)
    out = []
    r = ex.run(
        req(tmp_path, "sh", "-c", "echo hi; mkdir /x; write /etc/f data; exit 3"),
        lambda s, b: out.append((s, b)),
    )
    assert r.exit_code == 3
    assert out == [("stdout", b"hi\n")]
    assert (r.upper / "x").is_dir() and (r.upper / "etc/f").read_text() == "data"
    assert ex.runs[0].argv[0] == "sh"
    ex.close()
    with pytest.raises(ExecutorError, match="after close"):
        ex.run(req(tmp_path, "true"))


def test_fake_timeout_leaves_no_upper(tmp_path):
    from tlimage.executor.base import StepTimeout

    ex = FakeExecutor(hang=True)
    with pytest.raises(StepTimeout):
        ex.run(req(tmp_path, "true", timeout=1))
    assert not (tmp_path / "upper").exists()


def test_select_executor_rejects_unknown_isolation():
    with pytest.raises(TlimageError, match="unknown isolation 'vm'; expected one of: auto"):
        select_executor("vm")
    assert "namespace" in ISOLATIONS
    assert select_executor("fake").name == "fake"


# --- normalize_upper -------------------------------------------------------------------------


@root_only
def test_normalize_upper_unshares_whiteouts_and_prunes_copy_up_dirs(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in ("etc", "var/lib", "opq"):
        (lower / d).mkdir(parents=True)
    (upper / "etc").mkdir(parents=True)  # copy-up artefact: same meta as lower, empty
    (upper / "var/lib").mkdir(parents=True)  # nested artefacts
    (upper / "new").mkdir()  # new empty dir: kept
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")  # empty but opaque: kept
    os.chmod(lower / "var", 0o700)
    os.chmod(upper / "var", 0o755)  # changed mode: kept although empty after pruning lib
    (upper / "d").mkdir()
    os.mknod(upper / "d" / "w1", stat.S_IFCHR, 0)
    os.link(upper / "d" / "w1", upper / "d" / "w2")  # shared whiteout inode
    opaque = normalize_upper(upper, (lower,))
    assert opaque == ("opq",)
    assert not (upper / "etc").exists() and not (upper / "var/lib").exists()
    assert (upper / "var").is_dir() and (upper / "new").is_dir()
    s1, s2 = os.lstat(upper / "d/w1"), os.lstat(upper / "d/w2")
    assert s1.st_ino != s2.st_ino and s1.st_nlink == s2.st_nlink == 1
    assert stat.S_ISCHR(s2.st_mode) and s2.st_rdev == 0


# --- export unpacking ------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _info(name, type_=tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type = type_
    for k, v in kw.items():
        setattr(i, k, v)
    return i


@root_only
def test_unpack_export_restores_an_overlay_style_upper(tmp_path):
    from tlimage.sandbox.qemu.channel import unpack_export

    dest = tmp_path / "u"
    dest.mkdir()
    stream = _tar(
        [
            (_info("./", tarfile.DIRTYPE, mode=0o755), None),
            (_info("./etc", tarfile.DIRTYPE, mode=0o750, uid=5, gid=6), None),
            (_info("./etc/gone", tarfile.CHRTYPE, mode=0), None),
            (_info("./etc/gone2", tarfile.LNKTYPE, linkname="./etc/gone"), None),
            (_info("./f", size=3, mode=0o4755), b"abc"),
            (_info("./l", tarfile.SYMTYPE, linkname="/etc/passwd"), None),
        ]
    )
    unpack_export(stream, dest)
    assert (
        os.lstat(dest / "etc").st_uid == 5 and stat.S_IMODE(os.lstat(dest / "etc").st_mode) == 0o750
    )
    g1, g2 = os.lstat(dest / "etc/gone"), os.lstat(dest / "etc/gone2")
    assert stat.S_ISCHR(g2.st_mode) and g2.st_rdev == 0 and g1.st_ino != g2.st_ino
    assert (dest / "f").read_bytes() == b"abc" and stat.S_IMODE(
        os.lstat(dest / "f").st_mode
    ) == 0o4755
    assert os.readlink(dest / "l") == "/etc/passwd"


@pytest.mark.parametrize(
    "members",
    [
        [(_info("../evil", size=1), b"x")],
        [(_info("./l", tarfile.SYMTYPE, linkname="/tmp"), None), (_info("./l/evil", size=1), b"x")],
    ],
)
def test_unpack_export_refuses_escapes(tmp_path, members):
    from tlimage.sandbox.qemu.channel import unpack_export

    dest = tmp_path / "u"
    dest.mkdir()
    with pytest.raises(ExecutorError, match="leaves the destination|leads outside"):
        unpack_export(_tar(members), dest)


# --- flattening and tree keys ----------------------------------------------------------------


@root_only
def test_flatten_layers_applies_whiteouts_and_opaque_dirs(tmp_path):
    from tlimage.sandbox.qemu.disks import flatten_layers

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    (a / "keep").mkdir(parents=True)
    (a / "keep/old").write_text("1")
    (a / "gone").write_text("x")
    (a / "opq").mkdir()
    (a / "opq/hidden").write_text("h")
    (b / "opq").mkdir(parents=True)
    os.setxattr(b / "opq", "trusted.overlay.opaque", b"y")
    (b / "opq/new").write_text("n")
    os.mknod(b / "gone", stat.S_IFCHR, 0)
    (b / "keep/new").parent.mkdir()
    (b / "keep/new").write_text("2")
    flatten_layers([a, b], out)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert listing == ["keep", "keep/new", "keep/old", "opq", "opq/new"]
    assert "trusted.overlay.opaque" not in os.listxattr(out / "opq")


def test_tree_key_tracks_metadata(tmp_path):
    from tlimage.sandbox.qemu.disks import tree_key

    (tmp_path / "f").write_text("abc")
    k1 = tree_key(tmp_path)
    assert tree_key(tmp_path) == k1
    os.chmod(tmp_path / "f", 0o600)
    assert tree_key(tmp_path)[0] != k1[0]
    assert k1[2] == 2  # root + f


# --- provisioning helpers --------------------------------------------------------------------


def test_require_tool_names_the_apt_package():
    with pytest.raises(ProvisionError) as e:
        require_tool("no-such-tool-xyz", "for testing")
    assert "`no-such-tool-xyz` is not installed; it is needed for testing" in str(e.value)
    assert "apt-get install" in e.value.hint


def _ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=x\0")


def test_resolve_modules_orders_dependencies_and_skips_builtins(tmp_path):
    _ko(tmp_path / "kernel/a/virtio_ring.ko", "")
    _ko(tmp_path / "kernel/a/virtio.ko", "virtio_ring")
    _ko(tmp_path / "kernel/b/virtio_blk.ko", "virtio,virtio_ring,crc")
    _ko(tmp_path / "kernel/c/virtio-rng.ko", "virtio")
    (tmp_path / "modules.builtin").write_text("kernel/lib/crc.ko\n")
    order = [n for n, _ in resolve_modules(tmp_path, ["virtio_blk", "virtio_rng"])]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "virtio_rng"]
    with pytest.raises(ProvisionError, match="'missing' .*needed by the guest"):
        resolve_modules(tmp_path, ["missing"])


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off : off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = off + 110
        name = data[name_start : name_start + namesize - 1].decode()
        off = name_start + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_initramfs_is_a_deterministic_newc_archive():
    args = dict(busybox=b"BB", init=b"#!/bin/sh\n", agent=b"AG", modules=[("overlay", b"KO")])
    data = build_initramfs(**args)
    assert data == build_initramfs(**args)
    files = _read_newc(gzip.decompress(data))
    assert files["init"] == (0o100755, b"#!/bin/sh\n")
    assert files["tl/agent"][1] == b"AG"
    assert files["lib/modules/overlay.ko"][1] == b"KO"
    assert files["tl/modules"][1] == b"overlay\n"
    assert stat.S_ISCHR(files["dev/console"][0])
    assert len(_cpio_entry("x", 0o100644, b"abc")) % 4 == 0


def test_runner_sources_are_found():
    from tlimage.sandbox.qemu.provision import runner_source_dir

    src = runner_source_dir()
    assert (src / "agent.c").is_file() and (src / "PROTOCOL.md").is_file()


# --- bases -----------------------------------------------------------------------------------


def test_unknown_base_lists_the_choices(tmp_path):
    with pytest.raises(
        BaseError, match="unknown base 'alpine'; available: debian-minimal, debian-systemd"
    ):
        ensure_base("alpine", tmp_path)


def test_ubuntu_without_an_archive_names_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv("TLIMAGE_UBUNTU_MIRROR", raising=False)
    with pytest.raises(BaseError, match="ubuntu-minimal needs an Ubuntu archive") as e:
        ensure_base("ubuntu-minimal", tmp_path)
    assert "TLIMAGE_UBUNTU_MIRROR" in e.value.hint and "TLIMAGE_UBUNTU_KEYRING" in e.value.hint


def test_ubuntu_with_a_mirror_but_no_keyring_names_both_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TLIMAGE_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu")
    monkeypatch.setenv("TLIMAGE_UBUNTU_KEYRING", str(tmp_path / "missing.gpg"))
    with pytest.raises(BaseError, match="ubuntu-systemd needs an Ubuntu archive: the keyring") as e:
        ensure_base("ubuntu-systemd", tmp_path)
    assert "TLIMAGE_UBUNTU_KEYRING" in str(e.value)
    assert "TLIMAGE_UBUNTU_MIRROR" in e.value.hint


def test_static_elf_detection(tmp_path):
    import sys

    assert not _is_static_elf(Path(sys.executable).resolve())  # dynamically linked
    (tmp_path / "x").write_bytes(b"not elf")
    assert not _is_static_elf(tmp_path / "x")


@root_only
def test_auto_falls_back_to_namespace_with_one_notice(monkeypatch):
    import tlimage.sandbox
    import tlimage.sandbox.qemu.kvm

    monkeypatch.setenv("TLIMAGE_KVM", "0")
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    notices: list[str] = []
    first = select_executor("auto", notice=notices.append)
    second = select_executor("auto", notice=notices.append)
    assert first.name == second.name == "namespace"
    assert len(notices) == 1
    assert "KVM is not usable (TLIMAGE_KVM=0)" in notices[0]
    assert "namespace sandbox" in notices[0]
    # A new process on the same machine state says nothing; a changed state says it again.
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    select_executor("auto", notice=notices.append)
    assert len(notices) == 1
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    monkeypatch.setattr(
        tlimage.sandbox.qemu.kvm,
        "kvm_usable",
        lambda *_a: (
            False,
            "microVM (kvm) failed to boot: qemu: kvm.c:3183: Assertion `ret == n' failed.",
        ),
    )
    select_executor("auto", notice=notices.append)
    assert notices[1] == (
        "KVM is not usable (microVM (kvm) failed to boot); build steps and "
        "sandboxes run in a namespace sandbox (details: tl sbx doctor)"
    )


def test_catalog_rows_are_consistent():
    from tlimage.executor import catalog
    from tlimage.frontends.dockerfile.lower import SEED_BASES

    assert catalog.NAMES[0] == "debian-minimal"
    for spec in catalog.CATALOG:
        assert spec.variant in ("minimal", "systemd", "vnc", "tiny")
        assert (spec.init == "systemd") == (spec.variant in ("systemd", "vnc"))
        # The Dockerfile front end expands ENV words against the same environment.
        assert SEED_BASES[spec.name].env == spec.env, spec.name
        if spec.distribution != "busybox":
            assert {"python3", "python3-pip", "python-is-python3"} <= set(spec.packages)
            assert ("PIP_BREAK_SYSTEM_PACKAGES", "1") in spec.env
    assert catalog.default_base({}) == "debian-minimal"
    assert catalog.default_base({"TLIMAGE_UBUNTU_MIRROR": "http://m/ubuntu"}) == "ubuntu-minimal"


def test_notices_are_said_once_per_state(tmp_path, monkeypatch):
    from tlimage import notices

    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(tmp_path))
    said: list[str] = []
    assert notices.once("k", "a", "first", said.append)
    assert not notices.once("k", "a", "again", said.append)
    assert notices.once("k", "b", "changed", said.append)
    assert said == ["first", "changed"]
    assert (
        notices.short_reason("microVM (kvm) failed to boot: qemu: Assertion failed (cached)")
        == "microVM (kvm) failed to boot"
    )
