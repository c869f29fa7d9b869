"""RUN mounts through the build loop with the in-process fake executor: what each mount type
shows the step, what reaches keys, layers and logs, cache-mount persistence and sharing, secrets
from the build invocation. (tests/vm/test_mounts.py runs the same through the namespace sandbox.)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tlimage import ir
from tlimage.builder import build_image
from tlimage.builder.mounts import (
    MountError,
    Redactor,
    cache_mount_dir,
    clear_cache_mounts,
    ignored_below,
    mkdirs_in,
    parse_secret,
    resolve_in,
)
from tlimage.builder.mounts.cachemounts import cache_instance as _cache_instance
from tlimage.cache.store import BlobStore
from tlimage.errors import ExecutorError, TlimageError
from tlimage.executor.base import HostMount, RunRequest
from tlimage.executor.fake import FakeExecutor
from tlimage.frontends.mounts import mount_from_user
from tlimage.frontends.problem import Problem

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root (mknod)")

SECRET = b"hunter2-very-secret"


def build(path: Path, **kw):  # noqa: ANN201
    events: list[dict] = []
    ex = FakeExecutor()
    result = build_image(path, emit=events.append, executor=ex, **kw)
    return result, events, ex


def logs(events: list[dict]) -> str:
    return "".join(e["data"] for e in events if e["event"] == "build_log")


def layer_bytes(result) -> bytes:  # noqa: ANN001
    """The uncompressed tars of the layers the build added over its busybox base."""
    store = BlobStore()
    out = b""
    for la in result.manifest.layers[1:]:
        out += zstandard.ZstdDecompressor().decompressobj().decompress(store.read_bytes(la.digest))
    return out


def ran(events: list[dict]) -> list[int]:
    return [e["index"] for e in events if e["event"] == "step_done" and not e.get("config_only")]


def dockerfile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "Dockerfile"
    p.write_text(text)
    return p


# -- the mount definitions ------------------------------------------------------------------------


def test_defaults_are_buildkits() -> None:
    cache = mount_from_user("type=cache,target=/root/.cache/pip")
    assert (cache.id, cache.sharing, cache.readonly) == ("/root/.cache/pip", "shared", False)
    bind = mount_from_user("target=/src")
    assert isinstance(bind, ir.BindMount)
    assert (bind.source, bind.from_, bind.readonly) == ("", None, True)
    sec = mount_from_user("type=secret,id=tok")
    assert (sec.id, sec.target, sec.required, sec.mode) == ("tok", "/run/secrets/tok", False, None)
    by_target = mount_from_user("type=secret,target=/etc/token")
    assert (by_target.id, by_target.target) == ("token", "/etc/token")
    by_source = mount_from_user({"type": "secret", "source": "npmrc"})
    assert by_source.id == "npmrc"
    env_only = mount_from_user("type=secret,env=TOKEN,id=tok")
    assert (env_only.target, env_only.env) == ("", "TOKEN")
    both = mount_from_user({"type": "secret", "target": "/t", "env": "TOKEN", "id": "tok"})
    assert (both.target, both.env) == ("/t", "TOKEN")
    assert mount_from_user("type=tmpfs,target=/t,size=1m").size == 1 << 20
    assert mount_from_user({"type": "cache", "target": "/c", "mode": 0o700}).mode == 0o700
    assert mount_from_user("type=ssh") == ir.SshMount("default", "/run/buildkit/ssh_agent.0")


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ("type=cache,target=/c,sharing=sometimes", 'unsupported sharing value "sometimes"'),
        ("type=bind", "the target must be an absolute path"),
        ("type=cache,target=/a/../..", 'invalid mount target "/"'),
        ("type=secret", "one of source, target required"),
        ("type=cache,target=/c,uid=root", "invalid value root for uid"),
        ("type=tmpfs,target=/t,mode=0700", '"tmpfs" type mounts'),
    ],
)
def test_bad_mounts_are_named(mount: str, message: str) -> None:
    with pytest.raises(Problem, match=re.escape(message)):
        mount_from_user(mount)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ir.BindMount(""),
        lambda: ir.CacheMount("/c/../d", id="x"),
        lambda: ir.CacheMount("/c", id=""),
        lambda: ir.SecretMount("tok"),
        lambda: ir.TmpfsMount("/"),
    ],
)
def test_the_ir_refuses_mounts_the_builder_cannot_set_up(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_host_mount_keeps_secret_bytes_out_of_repr() -> None:
    m = HostMount.secret(SECRET, "/run/secrets/x")
    req = RunRequest(lowers=(Path("/"),), argv=("true",), upper_dir=Path("/nonexistent/u"),
                     mounts=(m,))  # fmt: skip
    assert SECRET.decode() not in repr(m) and SECRET.decode() not in repr(req)
    with pytest.raises(ExecutorError, match="absolute"):
        HostMount.tmpfs("relative")
    with pytest.raises(ExecutorError, match="needs a target"):
        HostMount.secret(b"x")


def test_mounts_sort_parents_first() -> None:
    req = RunRequest(lowers=(Path("/"),), argv=("true",), upper_dir=Path("/x/u"), mounts=(
        HostMount.tmpfs("/a/b/c"), HostMount.tmpfs("/a"), HostMount.secret(b"v", env="V"),
        HostMount.tmpfs("/z/y"),
    ))  # fmt: skip
    assert [m.target for m in req.sorted_mounts()] == ["/a", "/z/y", "/a/b/c"]


def test_microvm_plan_turns_mounts_into_agent_requests(tmp_path: Path) -> None:
    from tlimage.executor.microvm import _plan_mounts
    from tlimage.sandbox.qemu import protocol as P

    mounts = (
        HostMount.bind(tmp_path / "cache", "/root/.cache"),
        HostMount.bind(tmp_path / "ctx", "/src", readonly=True),
        HostMount.view((tmp_path / "l1", tmp_path / "l2"), "/out", "/o"),
        HostMount.tmpfs("/t", 1 << 20),
        HostMount.secret(SECRET, "/run/secrets/s", env="S", uid=7, mode=0o440),
        HostMount.secret(b"only-env", env="E"),
    )
    req = RunRequest(lowers=(tmp_path,), argv=("true",), upper_dir=tmp_path / "u", mounts=mounts)
    files = req.sorted_mounts()
    images = [
        (
            m,
            None if m.kind in ("tmpfs", "secret") else tmp_path / f"{k}.img",
            m.subpath if m.kind == "view" else "/",
        )
        for k, m in enumerate(files)
    ]
    plan = _plan_mounts(req, images, 3, "/tl/scratch/0")
    by_target = {b.target: b for b in plan.binds}
    assert [b.target for b in plan.binds] == [m.target for m in files]  # parents first
    cache = by_target["/root/.cache"]
    assert (cache.kind, cache.source_root, cache.readonly) == (
        P.BindKind.PATH,
        f"/tl/scratch/0/m{files.index(mounts[0])}/root",
        False,
    )
    ctx = by_target["/src"]
    assert (ctx.source_root, ctx.source, ctx.readonly) == (
        f"/tl/lower/{3 + [m for m in files if m.kind in ('bind', 'view')].index(mounts[1])}",
        "/",
        True,
    )
    assert by_target["/o"].source == "/out" and by_target["/o"].readonly
    assert by_target["/t"].kind == P.BindKind.TMPFS and by_target["/t"].size_kib == 1024
    sec = by_target["/run/secrets/s"]
    assert (sec.kind, sec.data, sec.uid, sec.mode) == (P.BindKind.DATA, SECRET, 7, 0o440)
    # writes to the cache are written back; the view's overlay is thrown away
    assert [w[1] for w in plan.writeback] == [tmp_path / "cache"]
    assert len(plan.overlays) == 2
    assert sorted(plan.env) == [b"E=only-env", b"S=" + SECRET]


@needs_root
def test_apply_upper_never_writes_through_links(tmp_path: Path) -> None:
    from tlimage.sandbox.upper import OPAQUE_XATTR, apply_upper

    dest, upper, outside = tmp_path / "dest", tmp_path / "upper", tmp_path / "outside"
    for d in (dest / "keep", dest / "opq", outside):
        d.mkdir(parents=True)
    (dest / "gone").write_text("x")
    (dest / "opq" / "old").write_text("old")
    (dest / "lnk").symlink_to(outside)  # planted by an earlier step
    (upper / "opq").mkdir(parents=True)
    os.setxattr(upper / "opq", OPAQUE_XATTR, b"y")
    (upper / "opq" / "new").write_text("new")
    (upper / "lnk").mkdir()
    (upper / "lnk" / "f").write_text("f")
    os.mknod(upper / "gone", 0o020000, 0)
    (upper / "file").write_text("file")
    apply_upper(upper, dest)
    assert sorted(os.listdir(dest)) == ["file", "keep", "lnk", "opq"]
    assert os.listdir(dest / "opq") == ["new"]
    assert (dest / "lnk").is_dir() and not (dest / "lnk").is_symlink()
    assert os.listdir(outside) == []


# -- secrets from the invocation -------------------------------------------------------------------


def test_parse_secret_like_buildx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "tok"
    f.write_bytes(SECRET)
    assert parse_secret(f"id=tok,src={f}") == ("tok", f)
    assert parse_secret(f"id=tok,source={f}") == ("tok", f)
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert parse_secret("id=tok,env=MY_TOKEN") == ("tok", b"from-env")
    assert parse_secret("type=env,id=tok,src=MY_TOKEN") == ("tok", b"from-env")
    assert parse_secret("id=MY_TOKEN") == ("MY_TOKEN", b"from-env")  # env var of that name
    assert parse_secret("id=npmrc") == ("npmrc", Path("npmrc"))  # else a file of that name
    for bad, msg in [
        ("src=", "an id is required"),
        ("id=x,color=red", "unexpected key 'color'"),
        ("id=x,env=NOPE_NOT_SET", "NOPE_NOT_SET is not set"),
        ("id=x,type=ssh", "unsupported type"),
        ("idx", "must be key=value"),
    ]:
        with pytest.raises(MountError, match=msg):
            parse_secret(bad)


def test_redactor_masks_values_split_across_chunks() -> None:
    r = Redactor([SECRET + b"\n", b"abc"])
    out = r.feed("stdout", b"token: hunter2-ve")
    out += r.feed("stdout", b"ry-secret and again hunter2-very-secret\n")
    out += r.flush("stdout")
    assert out == b"token: **** and again ****\n"
    # too short to mask, and a partial prefix at the end is released by flush
    assert r.feed("stderr", b"abc hunt") + r.flush("stderr") == b"abc hunt"
    assert Redactor([]).feed("stdout", b"as is") == b"as is"


# -- through the builder ------------------------------------------------------------------------


@needs_root
def test_cache_mount_persists_between_builds_and_stays_out_of_layers(tmp_path: Path) -> None:
    img = tmp_path / "image.py"
    mount = "options={'mounts': ['type=cache,target=/root/.cache/pip']}"
    img.write_text(
        "from tlimage import Image\n"
        "image = Image('c', base_image='busybox').run(\n"
        f"    'write /root/.cache/pip/wheel downloaded; write /out 1', {mount})\n"
    )
    data = cache_mount_dir(BlobStore().path, "/root/.cache/pip") / "0" / "wheel"
    assert not data.exists()
    first, _, ex1 = build(img)
    assert ex1.runs[0].mounts == (HostMount.bind(data.parent, "/root/.cache/pip"),)
    assert data.read_text() == "downloaded"
    assert b"downloaded" not in layer_bytes(first) and b"out" in layer_bytes(first)
    img.write_text(
        img.read_text().replace(
            "write /root/.cache/pip/wheel downloaded; write /out 1",
            "cat /root/.cache/pip/wheel; write /out 2",
        )
    )
    second, ev2, ex2 = build(img)
    assert len(ex2.runs) == 1  # the step changed, so it ran again ...
    assert logs(ev2) == "downloaded"  # ... and found what the first build left in the cache
    assert b"downloaded" not in layer_bytes(second)
    # the cache's contents are not an input: with the same step, a changed cache is a hit
    data.write_text("changed")
    _, _, ex3 = build(img)
    assert ex3.runs == []


@needs_root
def test_secret_is_visible_to_the_step_but_not_in_key_layer_logs_or_image(tmp_path: Path) -> None:
    f = tmp_path / "token.txt"
    f.write_bytes(SECRET)
    path = dockerfile(tmp_path, "FROM busybox\n"
                      "RUN --mount=type=secret,id=tok cat /run/secrets/tok; write /built yes\n"
                      "RUN --mount=type=secret,id=tok,env=TOKEN printenv TOKEN\n")  # fmt: skip
    result, events, ex = build(path, secrets={"tok": f})
    assert [m.kind for r in ex.runs for m in r.mounts] == ["secret", "secret"]
    assert ex.runs[0].mounts[0].target == "/run/secrets/tok"
    assert ex.runs[1].mounts[0].env == "TOKEN" and ex.runs[1].mounts[0].target == ""
    text = json.dumps(events)
    assert SECRET.decode() not in text and logs(events).count("****") == 2
    assert SECRET not in layer_bytes(result)
    assert SECRET not in json.dumps(result.manifest.config).encode()
    for db in Path(os.environ["TLIMAGE_CACHE_DIR"]).rglob("*.db*"):
        assert SECRET not in db.read_bytes(), db
    # another value is not another key: the build is fully cached
    _, _, ex2 = build(path, secrets={"tok": b"a different value"})
    assert ex2.runs == []


@needs_root
def test_missing_required_secret_names_the_line(tmp_path: Path) -> None:
    path = dockerfile(tmp_path, "FROM busybox\nRUN echo one\n"
                      "RUN --mount=type=secret,id=tok,required cat /run/secrets/tok\n")  # fmt: skip
    with pytest.raises(TlimageError) as err:
        build(path)
    assert str(err.value).startswith(f"{path}:3")
    assert "secret 'tok' is required" in str(err.value)
    assert "--secret id=tok" in err.value.render()
    # an optional secret that is missing is simply not mounted, as in BuildKit
    path.write_text("FROM busybox\nRUN --mount=type=secret,id=tok cat /run/secrets/tok\n")
    with pytest.raises(TlimageError, match="exit code 1"):
        build(path)


@needs_root
def test_secret_value_kinds(tmp_path: Path) -> None:
    path = dockerfile(tmp_path, "FROM busybox\nRUN --mount=type=secret,id=tok true\n")
    with pytest.raises(TlimageError, match=r"Dockerfile:2.*secret 'tok': cannot read .*missing"):
        build(path, secrets={"tok": tmp_path / "missing"})
    with pytest.raises(TlimageError, match="expected bytes .* or a Path") as err:
        build(path, secrets={"tok": "looks-like-a-value"})
    assert "looks-like-a-value" not in str(err.value)


@needs_root
def test_bind_from_context_shows_files_and_keys_on_them(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("alpha-content\n")
    (tmp_path / "src" / "secret.env").write_text("ignored\n")
    (tmp_path / "other.txt").write_text("not mounted\n")
    (tmp_path / ".dockerignore").write_text("src/secret.env\n")
    path = dockerfile(tmp_path, "FROM busybox\n"
                      "RUN --mount=type=bind,source=src,target=/src cat /src/a.txt; "
                      "cat /src/secret.env; write /out done\n")  # fmt: skip
    with pytest.raises(TlimageError) as err:  # the ignored file is not there
        build(path)
    assert "secret.env: No such file" in "\n".join(err.value.log_tail)  # type: ignore[attr-defined]
    path.write_text(path.read_text().replace("cat /src/secret.env; ", ""))
    result, events, ex = build(path)
    assert "alpha-content" in logs(events)
    (m,) = ex.runs[0].mounts
    assert (m.kind, m.target, m.readonly) == ("view", "/src", True)
    assert b"alpha-content" not in layer_bytes(result)
    # unrelated files do not touch the key; a mounted one does, and --explain names it
    (tmp_path / "other.txt").write_text("changed\n")
    _, _, ex2 = build(path)
    assert ex2.runs == []
    (tmp_path / "src" / "a.txt").write_text("beta\n")
    _, events3, ex3 = build(path, explain=True)
    assert len(ex3.runs) == 1 and "beta" in logs(events3)
    reasons = [e["reason"] for e in events3 if e["event"] == "explain"]
    assert reasons == ["files changed: src/a.txt (changed)"]


@needs_root
def test_bind_source_missing_names_the_line(tmp_path: Path) -> None:
    path = dockerfile(tmp_path, "FROM busybox\nRUN --mount=type=bind,source=nope,target=/n true\n")
    with pytest.raises(TlimageError, match=r"Dockerfile:2.*nope.*not found in the build context"):
        build(path)


@needs_root
def test_bind_rw_writes_are_discarded(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("original\n")
    path = dockerfile(tmp_path, "FROM busybox\n"
                      "RUN --mount=type=bind,target=/ctx,rw write /ctx/f.txt scribbled; "
                      "write /ctx/new x\n")  # fmt: skip
    result, _, ex = build(path)
    assert ex.runs[0].mounts[0].readonly is False
    assert (tmp_path / "f.txt").read_text() == "original\n"
    assert not (tmp_path / "new").exists()
    assert result.manifest.layers == build(path)[0].manifest.layers


@needs_root
def test_bind_from_another_stage_keys_on_that_stage(tmp_path: Path) -> None:
    (tmp_path / "v.txt").write_text("1\n")
    path = dockerfile(
        tmp_path,
        "FROM busybox AS build\nCOPY v.txt /out/v.txt\n"
        "FROM busybox\n"
        "RUN --mount=type=bind,from=build,source=/out,target=/o cat /o/v.txt\n",
    )
    _, events, ex = build(path)
    assert logs(events) == "1\n"
    (m,) = ex.runs[0].mounts
    assert (m.kind, m.subpath, m.target) == ("view", "/out", "/o")
    _, _, ex2 = build(path)
    assert ex2.runs == []
    (tmp_path / "v.txt").write_text("2\n")  # the stage changes, so the mounting step reruns
    _, events3, ex3 = build(path, explain=True)
    assert logs(events3) == "2\n" and len(ex3.runs) == 1
    reasons = [e["reason"] for e in events3 if e["event"] == "explain" and e["stage"] != "build"]
    assert len(reasons) == 1 and reasons[0].startswith("mount /o from changed: 'stage build ")


@needs_root
def test_tmpfs_writes_vanish(tmp_path: Path) -> None:
    path = dockerfile(
        tmp_path,
        "FROM busybox\nRUN --mount=type=tmpfs,target=/scratch,size=1m write /scratch/big x\n",
    )
    result, _, ex = build(path)
    assert ex.runs[0].mounts[0] == HostMount.tmpfs("/scratch", 1 << 20)
    assert result.manifest.layers == build(path)[0].manifest.layers  # no layer from the step
    assert len(result.manifest.layers) == 1


@needs_root
def test_ssh_mounts(tmp_path: Path) -> None:
    path = dockerfile(tmp_path, "FROM busybox\nRUN --mount=type=ssh,required git fetch\n")
    with pytest.raises(TlimageError, match=r"Dockerfile:2.*needs an SSH agent"):
        build(path)
    path.write_text("FROM busybox\nRUN --mount=type=ssh echo without\n")
    _, events, ex = build(path)
    assert ex.runs[0].mounts == ()
    assert any(
        "optional ssh mount at /run/buildkit/ssh_agent.0 is left out" in e["message"]
        for e in events
        if e["event"] == "status"
    )


@needs_root
def test_cache_mount_from_stage_is_seeded_and_keyed_apart(tmp_path: Path) -> None:
    path = dockerfile(tmp_path, "FROM busybox AS seed\nRUN mkdir -p /s; write /s/seeded yes\n"
                      "FROM busybox\n"
                      "RUN --mount=type=cache,id=c,from=seed,source=/s,target=/c cat /c/seeded\n"
                      "RUN --mount=type=cache,id=c,target=/c cat /c/seeded\n")  # fmt: skip
    events: list[dict] = []
    with pytest.raises(TlimageError) as err:
        build_image(path, emit=events.append, executor=FakeExecutor())
    # the first mount starts from the stage's /s; the plain cache of the same id is another one
    assert [e["data"] for e in events if e["event"] == "build_log" and e["index"] == 1] == ["yes"]
    assert str(err.value).startswith(f"{path}:5:")
    plain = cache_mount_dir(BlobStore().path, "c")
    assert (plain / "0").is_dir() and not (plain / "0" / "seeded").exists()


# -- cache sharing ------------------------------------------------------------------------------


class _B:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.emit = self.events.append


def test_cache_sharing_modes(tmp_path: Path) -> None:
    def spec(sharing: str):  # noqa: ANN202
        return ir.CacheMount("/c", id="/c", sharing=sharing)

    folder = tmp_path / "c"
    b = _B()
    with _cache_instance(folder, spec("locked"), "", None, b, None) as inst:
        assert inst == folder / "0" and inst.is_dir()
        # private: instance 0 is busy, so it gets its own
        with _cache_instance(folder, spec("private"), "", None, b, None) as other:
            assert other == folder / "1"
        # locked and shared wait for it; with a time-out they say so and give up
        with pytest.raises(MountError, match="timed out after 0.2s waiting for cache mount"):
            with _cache_instance(folder, spec("shared"), "", None, b, 0.2):
                pass
        assert any("waiting for cache mount '/c' (shared)" in e["message"] for e in b.events)
    # shared users share instance 0
    with _cache_instance(folder, spec("shared"), "", None, b, None) as a:
        with _cache_instance(folder, spec("shared"), "", None, b, 0.5) as c:
            assert a == c == folder / "0"


def test_locked_waits_for_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    fd = os.open(folder / "0.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, (fd,)).start()
    with _cache_instance(folder, ir.CacheMount("/c", id="/c", sharing="locked"),
                         "", None, _B(), 10) as inst:  # fmt: skip
        assert inst == folder / "0"


def test_clear_cache_mounts(tmp_path: Path) -> None:
    d = cache_mount_dir(BlobStore().path, "x") / "0"
    d.mkdir(parents=True)
    (d / "f").write_bytes(b"x" * 10000)
    assert clear_cache_mounts() > 0
    assert not d.exists()


# -- paths inside a root ------------------------------------------------------------------------


def test_paths_resolve_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "abs").symlink_to("/real")  # absolute: means root/real, not the host's /real
    (root / "up").symlink_to("../../outside")  # climbs no higher than the root
    (root / "planted").symlink_to(str(outside))  # what a step could leave in a cache mount
    assert resolve_in(str(root), "abs") == resolve_in(str(root), "abs/../real/.") == "real"
    with pytest.raises(FileNotFoundError):
        resolve_in(str(root), "up")  # root/outside does not exist, and the host's is not seen
    (root / "outside").mkdir()
    assert resolve_in(str(root), "up") == "outside"
    with pytest.raises(FileNotFoundError):
        resolve_in(str(root), "planted")  # root/<tmp>/outside does not exist
    with pytest.raises(MountError, match="planted is a link to nothing inside the cache"):
        mkdirs_in(str(root), "planted/sub")
    assert os.listdir(outside) == []  # nothing was made on the host side of the link
    assert mkdirs_in(str(root), "abs/new/deeper") == "real/new/deeper"
    assert (root / "real" / "new" / "deeper").is_dir()


def test_ignored_below_follows_dockerignore_rules(tmp_path: Path) -> None:
    from tlimage.cache.ignore import IgnoreMatcher

    for rel in ("src/a.py", "src/b.log", "src/logs/x.log", "src/logs/keep.log", "src/deep/n/y",
                "other/z"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    m = IgnoreMatcher(["**/*.log", "!src/logs/keep.log", "src/deep", "other"])
    assert ignored_below(str(tmp_path), "src", m) == ["src/b.log", "src/deep", "src/logs/x.log"]
    assert ignored_below(str(tmp_path), "src", IgnoreMatcher([])) == []
    assert "other" in ignored_below(str(tmp_path), "", m)


def test_fake_view_reads_hidden_names(tmp_path: Path) -> None:
    (tmp_path / "l" / "sub").mkdir(parents=True)
    (tmp_path / "l" / "sub" / ".env").write_text("dot")
    req = RunRequest(lowers=(tmp_path,), argv=("cat", "/m/.env"), upper_dir=tmp_path / "u",
                     mounts=(HostMount.view((tmp_path / "l",), "/sub", "/m"),))  # fmt: skip
    out: list[bytes] = []
    assert FakeExecutor().run(req, lambda _s, b: out.append(b)).exit_code == 0
    assert out == [b"dot"]
