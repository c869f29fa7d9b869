"""The microVM backend's host-side pieces without a VM: the shim's session bookkeeping, the
QEMU command line, the merged-layer lookup for placeholders, archive framing, and the sweep
of leftovers no record accounts for."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu.shim import Mux

T = P.FrameType
OK, EXIT0 = P.Frame(T.OK), P.encode_exit(P.Exit(0, 0))


def test_mux_gives_each_client_a_session_and_ends_it_when_it_leaves() -> None:
    m = Mux()
    a, b = object(), object()
    sa, sb = m.open(a), m.open(b)
    assert (sa, sb) == (1, 2)
    req = P.encode_exec(P.ExecMsg(("true",), (), "root", "/"))
    assert m.to_agent(b, req) == P.with_session(req, 2)
    assert m.from_agent(P.Frame(T.STDOUT, b"x", 2)) == (b, P.Frame(T.STDOUT, b"x"))
    assert m.from_agent(EXIT0) == (None, EXIT0)  # session 0 is the shim's own
    assert m.close(a) == P.Frame(T.END, b"", 1)
    assert m.from_agent(P.Frame(T.STDOUT, b"late", 1)) == (None, P.Frame(T.STDOUT, b"late"))
    # ids are taken in turn, so a late frame of an ended session never reaches a new client
    assert m.open(object()) == 3


def test_mux_wraps_around_and_skips_sessions_in_use() -> None:
    m = Mux()
    m.next = P.MAX_SESSION
    first = object()
    assert m.open(first) == P.MAX_SESSION
    assert m.open(object()) == 1
    m.next = P.MAX_SESSION
    assert m.open(object()) == 2  # MAX_SESSION and 1 are taken


def test_qemu_command_line(tmp_path: Path) -> None:
    from tests.unit.test_runtime import record
    from tlimage.runtime.microvm import qemu_argv
    from tlimage.sandbox.qemu.provision import GuestKit

    kit = GuestKit(tmp_path / "vmlinuz", tmp_path / "initrd.img", "linux-image-x", "1", "6.1",
                   "1.35", "k")  # fmt: skip
    named = record(name="web", tmp=tmp_path, cpus=1.5, memory_mb=768)
    argv = qemu_argv(named, kit, "tcg", [tmp_path / "l0.img", tmp_path / "l1.img"], True)
    joined = " ".join(argv)
    assert f"memory-backend-file,id=mem,size=768M,mem-path={named.dir}/ram,share=on" in joined
    assert "memory-backend=mem" in joined and argv[argv.index("-smp") + 1] == str(
        min(2, os.cpu_count() or 1)
    )
    assert "serial=tl-l0" in joined and "serial=tl-l1" in joined and "serial=tl-scratch" in joined
    assert "tl.net=1" in joined and "append=on" in joined  # the console survives a resume
    eph = qemu_argv(record(tmp=tmp_path, network=False), kit, "kvm", [], False)
    assert "memory-backend" not in " ".join(eph) and "-netdev" not in eph
    assert eph[eph.index("-accel") + 1] == "kvm"
    assert "tl.init=" not in joined  # an image without an init label: the agent's guest init
    labels = {"org.tlimage.init": "systemd", "x": "y"}
    sysd = record(tmp=tmp_path, extra={"image_config": {"labels": labels}})
    append = " ".join(qemu_argv(sysd, kit, "tcg", [], False))
    assert "tl.init=systemd" in append and "systemd.mask=systemd-modules-load.service" in append


def test_a_systemd_image_takes_the_microvm_unless_the_namespace_backend_was_asked_for() -> None:
    from tlimage.errors import RuntimeError_
    from tlimage.runtime._api import _systemd_backend

    said: list[str] = []
    assert _systemd_backend("debian-systemd", "auto", "namespace", None, said.append) == (
        "microvm",
        None,
    )
    assert _systemd_backend("img", "auto", "microvm", "kvm", said.append) == ("microvm", "kvm")
    with pytest.raises(RuntimeError_, match="boots systemd as init, which the namespace backend"):
        _systemd_backend("img", "namespace", "namespace", None, said.append)


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are device nodes: mknod needs root")
def test_placeholder_lookup_sees_the_merged_layers(tmp_path: Path) -> None:
    from tlimage.runtime.microvm import _exists_in_layers

    low, mid, top = (tmp_path / n for n in ("low", "mid", "top"))
    for d in (low / "etc", mid / "etc", top):
        d.mkdir(parents=True)
    (low / "etc" / "hosts").write_text("x")
    (low / "etc" / "resolv.conf").write_text("x")
    os.mknod(mid / "etc" / "resolv.conf", 0o020000, 0)  # a whiteout
    assert _exists_in_layers([low, mid, top], "etc/hosts")
    assert not _exists_in_layers([low, mid, top], "etc/resolv.conf")
    (top / "etc").mkdir()
    os.setxattr(top / "etc", "trusted.overlay.opaque", b"y")
    assert not _exists_in_layers([low, mid, top], "etc/hosts")
    assert not _exists_in_layers([low], "etc/missing")


def test_tar_frames_round_trip_through_a_sink_and_a_stream(tmp_path: Path) -> None:
    from tlimage.runtime.microvm import FRAME_CHUNK, _TarWriter
    from tlimage.runtime.namespace import read_tar, write_tar
    from tlimage.sandbox.qemu.channel import TarFrames

    sent: list[P.Frame] = []

    class Conn:
        def send(self, f: P.Frame) -> None:
            sent.append(f)

        def recv(self, _deadline: float | None) -> P.Frame:
            return sent.pop(0)

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(FRAME_CHUNK * 2 + 17))
    sink = _TarWriter(Conn())  # type: ignore[arg-type]
    write_tar(src, sink, arcname="src")
    sink.flush()
    assert all(f.type is T.TAR and 0 < len(f.payload) <= FRAME_CHUNK for f in sent)
    sent.append(OK)
    first = sent.pop(0)
    stream = TarFrames(Conn(), first=first)  # type: ignore[arg-type]
    read_tar(stream, tmp_path / "out", top="src")
    assert stream.finish() == OK
    assert (tmp_path / "out" / "big").read_bytes() == (src / "big").read_bytes()


def test_sweep_removes_only_old_unrecorded_folders(tmp_path: Path) -> None:
    from tests.unit.test_runtime import record
    from tlimage.runtime import _api
    from tlimage.runtime._state import StateDB

    root = _api.sandboxes_root()
    old, young, kept = root / "sb-orphan0001", root / "sb-orphan0002", root / "sb-kept000001"
    for d in (old, young, kept):
        d.mkdir(parents=True)
    past = time.time() - 3600
    os.utime(old, (past, past))
    os.utime(kept, (past, past))
    StateDB().insert(record("sb-kept000001", tmp=root))
    _api._sweep(StateDB())
    assert not old.exists() and young.exists() and kept.exists()


def test_tar_stream_is_a_raw_stream() -> None:
    from tlimage.sandbox.qemu.channel import TarFrames

    frames = [P.Frame(T.TAR, b"abc"), P.Frame(T.TAR, b"def"), OK]

    class Conn:
        def recv(self, _d: float | None) -> P.Frame:
            return frames.pop(0)

    s = TarFrames(Conn(), first=P.Frame(T.TAR, b"01"))  # type: ignore[arg-type]
    assert io.BufferedReader(s).read() == b"01abcdef" and s.finish() == OK
