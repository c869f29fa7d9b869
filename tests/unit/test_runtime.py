"""Runtime pieces that need no root and no VM: the state database and its transitions,
reconcile against a fake backend, environment merging, cp archives, process identity."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlimage.errors import RuntimeError_
from tlimage.runtime import _api
from tlimage.runtime._state import SandboxRecord, StateDB, Status
from tlimage.sandbox import proc as _proc
from tlimage.sandbox.fake import FakeBackend


def record(sid: str = "sb-0000000001", *, name: str | None = None, status: Status = Status.RUNNING,
           tmp: Path | None = None, **kw) -> SandboxRecord:  # fmt: skip
    d = (tmp or Path("/nonexistent")) / sid
    base = dict(
        id=sid, project="default", name=name, status=status, backend="fake", image_ref="img:latest",
        image_id="i" * 32, cpus=1.0, memory_mb=512, timeout=None, entrypoint=["sh", "-c", "x"],
        env=["A=1"], workdir=None, user=None, network=True, created_at=1.0, started_at=1.0,
        terminated_at=None, deadline=None, suspended_at=None, reason=None, exit_code=None,
        pids={"init": [123, 456]}, boot_id=_proc.boot_id(), dir=str(d), run_dir=str(d),
        cache_dir=None, extra={"config": {"env": ["PATH=/bin"]}},
    )  # fmt: skip
    base.update(kw)
    return SandboxRecord(**base)


# --- state -----------------------------------------------------------------------------------


def test_records_round_trip_and_transitions_are_compare_and_swap() -> None:
    db = StateDB()
    db.insert(record())
    got = db.get("sb-0000000001")
    assert got == record()
    rec = db.transition(got.id, [Status.RUNNING], Status.SUSPENDING, op_pid=7, op_start=8)
    assert (rec.status, rec.op_pid) == (Status.SUSPENDING, 7)
    with pytest.raises(RuntimeError_, match="is Suspending; this needs it Running"):
        db.transition(got.id, [Status.RUNNING], Status.SNAPSHOTTING)
    rec = db.transition(got.id, [Status.SUSPENDING], Status.SUSPENDED, extra={"k": [1]})
    assert rec.extra == {"k": [1]} and rec.status is Status.SUSPENDED
    with pytest.raises(RuntimeError_, match="no sandbox sb-missing"):
        db.transition("sb-missing", [Status.RUNNING], Status.TERMINATED)


def test_names_are_unique_per_project_and_prefixes_resolve() -> None:
    db = StateDB()
    db.insert(record("sb-aaaa000001", name="web"))
    db.insert(record("sb-aaaa000002", name="web", project="other"))
    with pytest.raises(RuntimeError_, match="named 'web' already exists") as e:
        db.insert(record("sb-aaaa000003", name="web"))
    assert e.value.hint == "remove it first: tl sbx rm web"
    assert [r.id for r in db.find_prefix("sb-aaaa")] == ["sb-aaaa000001", "sb-aaaa000002"]
    assert db.find_prefix("sb-aa_a") == []  # LIKE wildcards are escaped
    assert db.find_name("other", "web").id == "sb-aaaa000002"
    assert [r.id for r in db.list("default", [Status.RUNNING])] == ["sb-aaaa000001"]
    assert db.next_snapshot("sb-aaaa000001") == 1 and db.next_snapshot("sb-aaaa000001") == 2


def test_lookup_by_id_prefix_and_name(tmp_path: Path) -> None:
    db = StateDB()
    db.insert(record("sb-bbbb000001", name="api", status=Status.TERMINATED, tmp=tmp_path))
    db.insert(record("sb-bbbb000002", status=Status.TERMINATED, tmp=tmp_path))
    assert _api.Sandbox.get("api").id == "sb-bbbb000001"
    assert _api.Sandbox.get("sb-bbbb000002").id == "sb-bbbb000002"
    assert _api.Sandbox.get("bbbb000002").id == "sb-bbbb000002"
    with pytest.raises(RuntimeError_, match="matches 2 sandboxes"):
        _api.Sandbox.get("sb-bbbb")
    with pytest.raises(RuntimeError_, match="no sandbox 'nope'"):
        _api.Sandbox.get("nope")


# --- reconcile -------------------------------------------------------------------------------


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fb = FakeBackend()
    monkeypatch.setattr(_api, "backend_for", lambda name: fb)
    return fb


def test_reconcile_ends_dead_sandboxes_and_rolls_back_abandoned_operations(
    fake: FakeBackend, tmp_path: Path
) -> None:
    db = StateDB()
    db.insert(record("sb-dead000001", tmp=tmp_path))
    db.insert(record("sb-dead000002", name="t", tmp=tmp_path))
    db.insert(record("sb-snap000001", status=Status.SNAPSHOTTING, prev_status="Running",
                     tmp=tmp_path))  # fmt: skip
    db.insert(record("sb-susp000001", status=Status.SUSPENDING, tmp=tmp_path))
    db.insert(record("sb-pend000001", status=Status.PENDING, tmp=tmp_path))
    db.insert(record("sb-live000001", tmp=tmp_path))
    fake.live = {"sb-snap000001", "sb-susp000001", "sb-pend000001", "sb-live000001"}
    fake.frozen = {"sb-susp000001"}
    fake.exits = {"sb-dead000002": {"reason": "timeout", "exit_code": None, "at": 5.0}}
    _api.reconcile()

    def st(sid: str) -> SandboxRecord:
        r = db.get(sid)
        assert r is not None
        return r

    assert st("sb-dead000001").status is Status.TERMINATED
    assert st("sb-dead000001").reason == "its processes ended unexpectedly"
    assert (st("sb-dead000002").reason, st("sb-dead000002").terminated_at) == ("timeout", 5.0)
    assert ("cleanup", "sb-dead000001") in fake.calls
    assert ("cleanup-keep", "sb-dead000002") in fake.calls  # named: files kept
    assert st("sb-snap000001").status is Status.RUNNING and ("thaw", "sb-snap000001") in fake.calls
    assert st("sb-susp000001").status is Status.SUSPENDED
    assert st("sb-pend000001").reason == "the process creating it died"
    assert st("sb-live000001").status is Status.RUNNING


def test_reconcile_skips_sandboxes_whose_lock_is_held(fake: FakeBackend,
                                                      tmp_path: Path) -> None:  # fmt: skip
    db = StateDB()
    rec = record("sb-busy000001", status=Status.SNAPSHOTTING, prev_status="Running", tmp=tmp_path)
    db.insert(rec)
    fake.live = {rec.id}
    with _api._lock(rec):  # an operation in progress (here: in this process)
        _api.reconcile()
        assert db.get(rec.id).status is Status.SNAPSHOTTING
    _api.reconcile()
    assert db.get(rec.id).status is Status.RUNNING


def test_reconcile_after_reboot(fake: FakeBackend, tmp_path: Path) -> None:
    db = StateDB()
    db.insert(record("sb-boot000001", boot_id="old", tmp=tmp_path))
    db.insert(record("sb-boot000002", name="vm", status=Status.SUSPENDED, boot_id="old",
                     tmp=tmp_path))  # fmt: skip
    fake.survivors = {"sb-boot000002"}
    _api.reconcile()
    assert db.get("sb-boot000001").reason == "the host rebooted"
    kept = db.get("sb-boot000002")
    assert kept.status is Status.SUSPENDED and kept.boot_id == _proc.boot_id() and kept.pids == {}


def test_reconcile_terminates_a_sandbox_past_its_deadline(fake: FakeBackend,
                                                          tmp_path: Path) -> None:  # fmt: skip
    db = StateDB()
    db.insert(record("sb-late000001", deadline=1.0, tmp=tmp_path))
    fake.live = {"sb-late000001"}
    _api.reconcile()
    assert db.get("sb-late000001").reason == "timeout"
    assert ("stop", "sb-late000001") in fake.calls


# --- environment, names, cp arguments --------------------------------------------------------


def test_merge_env() -> None:
    assert _api.merge_env(["PATH=/bin", "A=1"], ["B=2", "A=3"]) == ["PATH=/bin", "A=3", "B=2"]
    assert _api.merge_env([])[0].startswith("PATH=/usr/local/sbin:")
    assert _api.merge_env(["X=a=b", "Y="])[1:] == ["X=a=b", "Y="]
    with pytest.raises(RuntimeError_, match="'NOEQ': expected KEY=VALUE"):
        _api.merge_env(["NOEQ"])


@given(st.lists(st.lists(st.tuples(st.text("ABC_", min_size=1, max_size=3),
                                   st.text(max_size=3)), max_size=4), max_size=4))  # fmt: skip
def test_merge_env_is_last_writer_wins(layers: list[list[tuple[str, str]]]) -> None:
    expect = {"PATH": _api.DEFAULT_PATH}
    merged: dict[str, str] = {}
    for layer in layers:
        for k, v in layer:
            merged[k] = v
    expect.update(merged)
    out = _api.merge_env(*[[f"{k}={v}" for k, v in layer] for layer in layers])
    assert dict(e.split("=", 1) for e in out) == expect


def test_sandbox_names() -> None:
    _api._check_name("web-1.dev_x")
    for bad in ("Web", "-x", "sb-123", "a" * 64, "has space"):
        with pytest.raises(RuntimeError_, match="invalid sandbox name"):
            _api._check_name(bad)
    assert _api.new_id().startswith("sb-") and len(_api.new_id()) == 13


def test_cp_argument_split() -> None:
    from tlimage.cli.sandbox import _split

    assert _split("sb-1:/tmp/x") == ("sb-1", "/tmp/x")
    assert _split("web:/") == ("web", "/")
    assert _split("./a:/b") == (None, "./a:/b")
    assert _split("C:relative") == (None, "C:relative")
    assert _split("plain.txt") == (None, "plain.txt")


# --- cp archives -----------------------------------------------------------------------------


def test_cp_archive_round_trip(tmp_path: Path) -> None:
    from tlimage.runtime.namespace import read_tar, write_tar

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("data")
    os.chmod(src / "d" / "f", 0o751)
    os.symlink("/etc/passwd", src / "abs-link")
    os.link(src / "d" / "f", src / "hard")
    buf = io.BytesIO()
    write_tar(src, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        names = tf.getnames()
        assert names[0] == "_" and all(n == "_" or n.startswith("_/") for n in names)
        assert {m.uid for m in tf.getmembers()} == {0}
    buf.seek(0)
    read_tar(buf, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "d" / "f").read_text() == "data"
    assert (out / "d" / "f").stat().st_mode & 0o777 == 0o751
    assert os.readlink(out / "abs-link") == "/etc/passwd"  # kept, never followed
    assert (out / "hard").stat().st_ino == (out / "d" / "f").stat().st_ino


def test_cp_archive_from_a_sandbox_cannot_escape(tmp_path: Path) -> None:
    from tlimage.runtime.namespace import read_tar

    def archive(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for ti, data in members:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        buf.seek(0)
        return buf

    def dir_(name: str) -> tuple[tarfile.TarInfo, bytes]:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE
        return ti, b""

    def link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = tarfile.SYMTYPE, target
        return ti, b""

    with pytest.raises(RuntimeError_, match="unexpected entry"):
        read_tar(archive((tarfile.TarInfo("../evil"), b"x")), tmp_path / "a")
    # A link planted by the archive must not carry a later entry outside the target.
    (tmp_path / "outside").mkdir()
    with pytest.raises(RuntimeError_, match="leads outside"):
        read_tar(archive(dir_("_"), link("_/l", str(tmp_path / "outside")),
                         (tarfile.TarInfo("_/l/pwned"), b"x")), tmp_path / "b")  # fmt: skip
    assert not (tmp_path / "outside" / "pwned").exists()
    with pytest.raises(RuntimeError_, match="leads outside"):
        read_tar(archive(dir_("_"), link("_/up", ".."), (tarfile.TarInfo("_/up/pwned"), b"x")),
                 tmp_path / "b2")  # fmt: skip
    assert not (tmp_path / "pwned").exists()
    hard = tarfile.TarInfo("_/h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    with pytest.raises(RuntimeError_, match="points outside"):
        read_tar(archive(dir_("_"), (hard, b"")), tmp_path / "b3")
    dev = tarfile.TarInfo("_/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    read_tar(archive(dir_("_"), (dev, b"")), tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "null").exists()


# --- processes -------------------------------------------------------------------------------


def test_a_pid_is_trusted_only_with_its_start_time() -> None:
    me = _proc.ident(os.getpid())
    assert me is not None and _proc.alive(me)
    assert not _proc.alive([me[0], me[1] + 1])  # a recycled pid
    assert not _proc.alive(None) and not _proc.alive([2**22 + 7, 0])
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    entry = _proc.ident(child.pid)
    while _proc.proc_state(child.pid) not in ("Z", None):
        pass
    assert entry is None or not _proc.alive(entry)  # a zombie is dead
    child.wait()


def test_comm_with_parentheses_and_spaces_parses(tmp_path: Path) -> None:
    exe = tmp_path / "odd) name ("
    exe.symlink_to(sys.executable)
    p = subprocess.Popen([str(exe), "-c", "import time; time.sleep(5)"])
    try:
        entry = _proc.ident(p.pid)
        assert entry is not None and _proc.alive(entry) and _proc.ppid(p.pid) == os.getpid()
    finally:
        p.kill()
        p.wait()


def test_auto_backend_follows_the_builds_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import tlimage.sandbox
    import tlimage.sandbox.namespace
    import tlimage.sandbox.qemu.kvm

    notes: list[str] = []
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    monkeypatch.setattr(
        tlimage.sandbox.qemu.kvm, "kvm_usable", lambda _c, _p=None: (True, "booted")
    )
    assert _api.select_backend("auto", None, notes.append) == ("microvm", "kvm")
    monkeypatch.setattr(
        tlimage.sandbox.qemu.kvm, "kvm_usable", lambda _c, _p=None: (False, "no /dev/kvm")
    )
    monkeypatch.setattr(tlimage.sandbox.namespace, "check_host", lambda: None)
    assert _api.select_backend("auto", None, notes.append) == ("namespace", None)
    assert _api.select_backend("auto", None, notes.append) == ("namespace", None)
    assert len(notes) == 1 and "no /dev/kvm" in notes[0]  # said once
    monkeypatch.setattr(tlimage.sandbox, "_noticed", False)
    monkeypatch.setattr(tlimage.sandbox.namespace, "check_host", lambda: "no root")
    assert _api.select_backend("auto", None, notes.append) == ("microvm", "tcg")
    assert "TCG" in notes[-1]
    assert _api.select_backend("namespace", None) == ("namespace", None)
    with pytest.raises(RuntimeError_, match="unknown backend 'docker'"):
        _api.select_backend("docker", None)


def test_the_init_helpers_the_exec_helper_borrows_are_there() -> None:
    """sandbox/_enter.py imports `_init` as `ns` at run time: every `ns.NAME` it uses exists."""
    import re

    import tlimage.sandbox._init as ns

    source = Path(ns.__file__).with_name("_enter.py").read_text()
    used = set(re.findall(r"\bns\.([A-Za-z_]+)", source))
    assert {"fail", "become", "start", "STATUS_FD", "load_seccomp"} <= used
    assert [n for n in sorted(used) if not hasattr(ns, n)] == []


def test_live_layer_digests_are_those_of_sandboxes_that_have_not_ended() -> None:
    from tlimage.runtime import live_layer_digests

    db = StateDB()
    lay = [{"digest": "xxh3:" + "a" * 32, "diff_id": "sha256:x", "size": 1}]
    db.insert(record("sb-layr000001", extra={"layers": lay}))
    db.insert(
        record(
            "sb-layr000002",
            status=Status.TERMINATED,
            extra={"layers": [{**lay[0], "digest": "xxh3:" + "b" * 32}]},
        )
    )
    assert live_layer_digests() == {"xxh3:" + "a" * 32}


def test_catalog_bases_come_from_the_runtimes_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime builds no image: a base comes from the BaseImages it is handed, or the one
    # `use_bases` set; without one, an unnamed image is a clear error, not a build.
    from tlimage.runtime import _bases

    class Reg:
        def find(self, proj: str, ref: str) -> None:
            return None

        def get(self, proj: str, ref: str) -> None:
            raise RuntimeError_(f"no image {ref} in {proj}")

    class Bases:
        asked: list[str] = []

        def default(self) -> tuple[str, str]:
            return "tiny-base", "the test's default"

        def init(self, name: str) -> str | None:
            return "none" if name == "tiny-base" else None

        def image(self, name: str, cache_dir: Path | None) -> str:
            self.asked.append(name)
            return f"image of {name}"

    monkeypatch.setattr(_bases, "_default", None)
    said: list[str] = []
    monkeypatch.setenv("TLIMAGE_NOTICES", "always")
    with pytest.raises(RuntimeError_, match="no base catalog"):
        _api._image_or_base(Reg(), "p", None, None, said.append, "namespace", None)
    got = _api._image_or_base(Reg(), "p", None, None, said.append, "namespace", Bases())
    assert got == "image of tiny-base" and said == ["the test's default"]
    with pytest.raises(RuntimeError_, match="no image tiny-base:v2"):  # a tag: not the base
        _api._image_or_base(Reg(), "p", "tiny-base:v2", None, None, "namespace", Bases())
    _bases.use_bases(Bases())
    assert _api._image_or_base(Reg(), "p", "tiny-base", None, None, "namespace", None) == (
        "image of tiny-base"
    )


def test_tlimage_sandbox_hands_the_builders_catalog_to_the_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tlimage
    from tlimage.builder.bases import CatalogBases
    from tlimage.executor import catalog
    from tlimage.runtime import _bases

    monkeypatch.setattr(_bases, "_default", None)
    monkeypatch.delitem(vars(tlimage), "Sandbox", raising=False)
    assert tlimage.Sandbox is _api.Sandbox
    cat = _bases.current()
    assert isinstance(cat, CatalogBases)
    assert cat.default()[0] == catalog.default_base()
    assert cat.init("debian-systemd") == "systemd" and cat.init("no-such-base") is None
