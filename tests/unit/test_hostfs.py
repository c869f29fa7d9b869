"""Host-side file safety: hostile archives and trees given to ADD, COPY (--from), layer
unpacking and `tl sbx cp` never change anything outside their destination. Each test plants a
bait tree beside the destination and checks it (owner, mode, mtime, link count, bytes) after."""

from __future__ import annotations

import functools
import http.server
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage import _fs
from tlimage.builder import build_image
from tlimage.errors import TlimageError
from tlimage.executor.fake import FakeExecutor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root (mknod)")

BAIT_UID = 1234


# -- the bait ----------------------------------------------------------------------------------


def make_bait(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bait.txt").write_bytes(b"do not touch\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "inner").write_bytes(b"inner\n")
    if not (folder / "link").is_symlink():
        (folder / "link").symlink_to("bait.txt")
    for p in (folder / "bait.txt", folder / "sub" / "inner", folder / "sub"):
        os.chown(p, BAIT_UID, BAIT_UID)
        os.chmod(p, 0o640 if p.is_file() else 0o750)
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body: bytes | str = f.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = ""
            out[os.path.relpath(p, folder)] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns,
                                               st.st_nlink, st.st_ino, body)  # fmt: skip
    st = os.lstat(folder)
    out["."] = (st.st_uid, st.st_gid, st.st_mode, st.st_nlink)
    return out


@pytest.fixture
def bait(tmp_path: Path) -> Iterator[Path]:
    folder = make_bait(tmp_path / "bait")
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before, "the bait tree outside the destination changed"


def no_links_to(bait: Path, tree: Path) -> None:
    """Nothing under `tree` shares an inode with a bait file (no hard link to the host)."""
    inodes = {(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in bait.rglob("*")}
    for p in tree.rglob("*"):
        st = os.lstat(p)
        assert (st.st_dev, st.st_ino) not in inodes, f"{p} is a hard link to a bait file"


# -- archives --------------------------------------------------------------------------------


def entry(name: str, kind: str = "file", *, data: bytes = b"", target: str = "",
          mode: int = 0o755, uid: int = 4242) -> tuple[tarfile.TarInfo, bytes]:  # fmt: skip
    ti = tarfile.TarInfo(name)
    ti.uid = ti.gid = uid
    ti.mode = mode
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
               "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE}[kind]  # fmt: skip
    ti.linkname = target
    ti.size = len(data)
    return ti, data


def tar_bytes(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def hostile_archives(bait: Path) -> dict[str, bytes]:
    b = str(bait / "bait.txt")
    return {
        "hardlink": tar_bytes(entry("hl", "hard", target=b)),
        "hardlink-relative": tar_bytes(entry("hl", "hard", target="../../../../../../" + b)),
        "symlink-then-hardlink": tar_bytes(
            entry("s", "sym", target=b),
            entry("hl", "hard", target="s"),
            entry("hl2", "hard", target="s/"),
            entry("s", "file", data=b"x"),
        ),
        "symlink-dir-then-file": tar_bytes(
            entry("d", "sym", target=str(bait)),
            entry("d/bait.txt", "file", data=b"PWNED"),
            entry("d/sub/inner", "file", data=b"PWNED"),
        ),
        "symlink-dir-then-hardlink": tar_bytes(
            entry("d", "sym", target=str(bait)), entry("h", "hard", target="d/bait.txt")
        ),
        "dotdot": tar_bytes(entry("a/../../bait.txt", "file", data=b"PWNED")),
        "symlink-chain": tar_bytes(
            entry("a", "sym", target="b"),
            entry("b", "sym", target="../../../" + str(bait)),
            entry("a/bait.txt", "file", data=b"PWNED"),
        ),
    }


@pytest.mark.parametrize("case", list(hostile_archives(Path("/x"))))
def test_add_of_a_hostile_tar_leaves_the_host_alone(tmp_path: Path, bait: Path, case: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "h.tar").write_bytes(hostile_archives(bait)[case])
    (ctx / "Dockerfile").write_text("FROM scratch\nADD h.tar /t/\n")
    try:
        result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    except TlimageError as e:
        assert "Dockerfile:2" in str(e)  # located at the ADD
    else:
        assert result.manifest is not None
    no_links_to(bait, Path(os.environ["TLIMAGE_CACHE_DIR"]))


@pytest.mark.parametrize("case", list(hostile_archives(Path("/x"))))
@pytest.mark.parametrize("mode", ["apply", "overlay", "plain", "cp", "export"])
def test_extractors_keep_hostile_tars_inside(tmp_path: Path, bait: Path, case: str,
                                             mode: str) -> None:  # fmt: skip
    data = hostile_archives(bait)[case]
    dest = tmp_path / "dest"
    try:
        if mode == "apply":
            from tlimage.cache.layer import apply_layer

            apply_layer(io.BytesIO(data), dest, compressed=False)
        elif mode == "overlay":
            import zstandard

            from tlimage.cache.unpacked import unpack_for_overlay

            dest.mkdir()
            unpack_for_overlay(io.BytesIO(zstandard.ZstdCompressor().compress(data)), dest)
        elif mode == "plain":
            _fs.extract_tar(io.BytesIO(data), dest, under="t")
        elif mode == "cp":
            from tlimage.runtime.namespace import read_tar

            renamed = io.BytesIO()
            with (
                tarfile.open(fileobj=io.BytesIO(data)) as src,
                tarfile.open(fileobj=renamed, mode="w", format=tarfile.PAX_FORMAT) as out,
            ):
                out.addfile(entry("_", "dir")[0])
                for m in src:
                    m.name = "_/" + m.name
                    if m.islnk():
                        m.linkname = "_/" + m.linkname
                    out.addfile(m, src.extractfile(m) if m.isreg() else None)
            renamed.seek(0)
            read_tar(renamed, dest)
        else:
            from tlimage.executor.microvm import unpack_export

            dest.mkdir()
            unpack_export(io.BytesIO(data), dest)  # type: ignore[arg-type]
    except TlimageError:
        pass
    no_links_to(bait, dest)


def test_hard_links_inside_the_archive_still_work(tmp_path: Path) -> None:
    data = tar_bytes(
        entry("d", "dir"),
        entry("d/f", "file", data=b"one", mode=0o4755),
        entry("g", "hard", target="d/f"),
        entry("l", "sym", target="/d"),
    )
    dest = tmp_path / "dest"
    _fs.extract_tar(io.BytesIO(data), dest)
    assert os.lstat(dest / "g").st_ino == os.lstat(dest / "d" / "f").st_ino
    assert os.readlink(dest / "l") == "/d"
    st = os.lstat(dest / "d" / "f")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 4242  # set-id bits kept


# -- ADD <url> ---------------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def image_tree(result, dest: Path) -> Path:  # noqa: ANN001 - BuildResult
    from tlimage.cache.cache import LayerCache
    from tlimage.cache.layer import apply_layer

    with LayerCache(None) as cache:
        for la in result.manifest.layers:
            with cache.store.open(la.digest, verify=True) as f:
                apply_layer(f, dest)
    return dest


def test_add_url_of_a_hostile_tar_keeps_it_a_file(tmp_path: Path, bait: Path,
                                                  http_dir: tuple[Path, str]) -> None:  # fmt: skip
    served, base = http_dir
    (served / "h.tar").write_bytes(hostile_archives(bait)["hardlink"])
    (served / "plain.txt").write_bytes(b"plain\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM scratch\nADD {base}/h.tar {base}/plain.txt /t/\n")
    result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    tree = image_tree(result, tmp_path / "img")
    for name in ("h.tar", "plain.txt"):
        st = os.lstat(tree / "t" / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
    assert (tree / "t" / "h.tar").read_bytes() == (served / "h.tar").read_bytes()
    assert not (tree / "t" / "hl").exists()
    no_links_to(bait, Path(os.environ["TLIMAGE_CACHE_DIR"]))


# -- COPY --from with a planted symlink --------------------------------------------------------


def test_copy_from_a_stage_with_a_planted_symlink_and_a_wildcard(tmp_path: Path,
                                                                 bait: Path) -> None:  # fmt: skip
    """The stage links /data to a host folder; `COPY --from=a /data/* /x/` must resolve /data
    inside the stage's root, never on the host."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "plant.tar").write_bytes(
        tar_bytes(
            entry("data", "sym", target=str(bait)), entry("d2", "sym", target="../../" + str(bait))
        )
    )
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS a\nADD plant.tar /\n\nFROM scratch\nCOPY --from=a /data/* /x/\n"
    )
    with pytest.raises(TlimageError, match="matches no file"):
        build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS a\nADD plant.tar /\n\nFROM scratch\nCOPY --from=a /d2/sub/* /x/\n"
    )
    with pytest.raises(TlimageError, match="matches no file"):
        build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS a\nADD plant.tar /\n\nFROM scratch\nCOPY --from=a /data /x/\n"
    )
    with pytest.raises(TlimageError, match="not found"):
        build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)


def test_copy_from_follows_links_inside_the_stage(tmp_path: Path, bait: Path) -> None:
    """A link inside the stage pointing at an absolute path resolves against the stage's root:
    the stage's own files are found, the host's same-named ones are not."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    inner = str(bait).lstrip("/")
    (ctx / "plant.tar").write_bytes(
        tar_bytes(
            entry(inner, "dir"),
            entry(f"{inner}/mine.txt", "file", data=b"stage's own"),
            entry("data", "sym", target=str(bait)),
        )
    )
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS a\nADD plant.tar /\n\nFROM scratch\nCOPY --from=a /data/* /x/\n"
    )
    result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    tree = image_tree(result, tmp_path / "img")
    assert sorted(os.listdir(tree / "x")) == ["mine.txt"]
    assert (tree / "x" / "mine.txt").read_bytes() == b"stage's own"


def test_copy_keeps_a_symlink_to_a_folder(tmp_path: Path, bait: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "src" / "real").mkdir(parents=True)
    (ctx / "src" / "real" / "f").write_text("f")
    (ctx / "src" / "to-real").symlink_to("real")
    (ctx / "src" / "to-bait").symlink_to(bait)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY src/ /app/\n")
    result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    tree = image_tree(result, tmp_path / "img")
    assert os.readlink(tree / "app" / "to-real") == "real"
    assert os.readlink(tree / "app" / "to-bait") == str(bait)


def test_copy_of_a_link_and_a_folder_through_it_stays_inside(tmp_path: Path, bait: Path) -> None:
    """Two sources: a symlink `d -> <bait>` copied first, then a folder with `d/bait.txt`; the
    second must not write through the first."""
    ctx = tmp_path / "ctx"
    (ctx / "one").mkdir(parents=True)
    (ctx / "one" / "d").symlink_to(bait)
    (ctx / "two" / "d").mkdir(parents=True)
    (ctx / "two" / "d" / "bait.txt").write_text("PWNED")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY one/ two/ /\n")
    build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)


def test_chown_names_are_read_inside_the_image(tmp_path: Path, bait: Path) -> None:
    """`COPY --chown=NAME` looks NAME up in the image's /etc/passwd; an /etc the image links to a
    host folder is not followed there."""
    (bait / "etc").mkdir()
    (bait / "etc" / "passwd").write_text("hostonly:x:4242:4242::/:/bin/sh\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("f")
    (ctx / "plant.tar").write_bytes(tar_bytes(entry("etc", "sym", target=str(bait / "etc"))))
    (ctx / "Dockerfile").write_text("FROM scratch\nADD plant.tar /\nCOPY --chown=hostonly f /f\n")
    with pytest.raises(TlimageError, match="no user 'hostonly'"):
        build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    (bait / "etc" / "passwd").unlink()
    (bait / "etc").rmdir()


# ----------------------------------------------------------------------------------------------
# write_atomic and flock_wait


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    _fs.write_atomic(tmp_path / "link", "new", 0o600)
    assert link.is_file() and not link.is_symlink()  # the link is replaced, never followed
    assert target.read_text() == "old"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600 and link.read_text() == "new"

    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):  # the rename fails: no temp file is left behind
        _fs.write_atomic(tmp_path / "d", b"x")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f", "link"]


def test_flock_wait_waits_tells_once_and_times_out(tmp_path: Path) -> None:
    import fcntl
    import time

    path = tmp_path / "lock"
    holder = _fs.flock_wait(path, 0)  # free: one try is enough
    told: list[float] = []
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            _fs.flock_wait(path, 0.3, lambda: told.append(time.monotonic()))
        assert 0.3 <= time.monotonic() - t0 < 2 and len(told) == 1
        with pytest.raises(TimeoutError):
            _fs.flock_wait(path, 0, lambda: told.append(0))
        assert len(told) == 1  # a single try does not say it waits
        threading.Timer(0.2, os.close, (holder,)).start()
        fd = _fs.flock_wait(path, 5)  # released while waiting
        holder = -1
        os.close(fd)
        a = _fs.flock_wait(path, 0, shared=True)
        b = _fs.flock_wait(os.open(path, os.O_RDWR), 0, shared=True)  # shared holders coexist
        with pytest.raises(TimeoutError):
            _fs.flock_wait(path, 0)
        for fd in (a, b):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    finally:
        if holder >= 0:
            os.close(holder)


def _node(name: str, kind: int, major: int, minor: int) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor = kind, major, minor
    ti.mode, ti.uid, ti.gid = 0o666, 4242, 4242
    return ti, b""


def test_device_nodes_one_rule_for_add_layers_and_pulls(tmp_path: Path) -> None:
    """The device-node rule of tlimage._fs: accepted wherever the archive puts them (as Docker
    does) by ADD, stored layers (apply and overlay unpack) and the pull/import stream check;
    created on the host owned by root with mode 0600 whatever the archive says."""
    import zstandard

    from tlimage.cache.layer import apply_layer
    from tlimage.cache.unpacked import unpack_for_overlay
    from tlimage.oci.pull import TarChecker

    data = tar_bytes(
        entry("dev", "dir"),
        _node("dev/console", tarfile.CHRTYPE, 5, 1),
        entry("opt", "dir"),
        _node("opt/null", tarfile.CHRTYPE, 1, 3),
        _node("opt/disk", tarfile.BLKTYPE, 7, 0),
    )
    checker = TarChecker("layer", "ref")
    checker.feed(data)
    checker.finish()
    assert checker.entries == 5
    assert _fs.refused_entry("opt/disk", "4") is None
    assert "leaves the tree" in (_fs.refused_entry("../disk", "4") or "")

    def check(root: Path) -> None:
        for name, kind, dev in (("dev/console", stat.S_ISCHR, (5, 1)),
                                ("opt/null", stat.S_ISCHR, (1, 3)),
                                ("opt/disk", stat.S_ISBLK, (7, 0))):  # fmt: skip
            st = os.lstat(root / name)
            assert kind(st.st_mode), name
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev
            assert stat.S_IMODE(st.st_mode) == _fs.DEVICE_MODE and (st.st_uid, st.st_gid) == (0, 0)

    apply_layer(io.BytesIO(data), tmp_path / "apply", compressed=False)
    check(tmp_path / "apply")
    (tmp_path / "overlay").mkdir()
    unpack_for_overlay(io.BytesIO(zstandard.ZstdCompressor().compress(data)), tmp_path / "overlay")
    check(tmp_path / "overlay")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "n.tar").write_bytes(data)
    (ctx / "Dockerfile").write_text("FROM scratch\nADD n.tar /\n")
    result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False)
    from tlimage.cache.store import BlobStore

    store = BlobStore(os.environ["TLIMAGE_CACHE_DIR"])
    with store.open(result.manifest.layers[-1].digest, verify=True) as f:
        apply_layer(f, tmp_path / "added")
    check(tmp_path / "added")
