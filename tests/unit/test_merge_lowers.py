"""merge_lowers: a stack of overlay-format layer folders laid out as one tree (what COPY --from
reads), the way overlayfs shows it: whiteouts delete, opaque folders hide what is below, a
file replaces a folder and the other way round; files are links, nothing is copied."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tlimage.cache.unpacked import merge_lowers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are 0:0 devices (root)")


def tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir {stat.S_IMODE(st.st_mode):o} {st.st_uid}"
            else:
                out[rel] = p.read_text()
    return out


def test_stack_merges_as_overlayfs_shows_it(tmp_path):
    low, mid, top = (tmp_path / n for n in ("low", "mid", "top"))
    for d in (low, mid, top):
        d.mkdir()
    (low / "etc").mkdir()
    (low / "etc" / "keep").write_text("keep")
    (low / "etc" / "gone").write_text("gone")
    (low / "opt" / "old").mkdir(parents=True)
    (low / "opt" / "old" / "a").write_text("a")
    (low / "var").mkdir()
    (low / "var" / "was-dir").mkdir()
    (low / "var" / "was-dir" / "x").write_text("x")
    (low / "var" / "was-file").write_text("f")
    os.symlink("usr/bin", low / "bin")

    (mid / "etc").mkdir()
    os.mknod(mid / "etc" / "gone", stat.S_IFCHR, 0)  # whiteout
    (mid / "etc" / "keep").write_text("keep v2")
    (mid / "opt").mkdir()
    os.setxattr(mid / "opt", "trusted.overlay.opaque", b"y")
    (mid / "opt" / "new").write_text("new")
    (mid / "var").mkdir(mode=0o750)
    os.chmod(mid / "var", 0o750)
    (mid / "var" / "was-dir").write_text("now a file")
    (mid / "var" / "was-file").mkdir()
    (mid / "var" / "was-file" / "y").write_text("y")

    os.mknod(top / "bin", stat.S_IFCHR, 0)
    (top / "etc").mkdir()
    os.mknod(top / "etc" / "never-there", stat.S_IFCHR, 0)

    dest = tmp_path / "merged"
    dest.mkdir()
    merge_lowers([low, mid, top], dest)
    assert tree(dest) == {
        "etc": "dir 755 0", "etc/keep": "keep v2",
        "opt": "dir 755 0", "opt/new": "new",
        "var": "dir 750 0", "var/was-dir": "now a file",
        "var/was-file": "dir 755 0", "var/was-file/y": "y",
    }  # fmt: skip
    # Links, not copies; and no overlay marker travels into the merged tree.
    assert (dest / "opt" / "new").stat().st_ino == (mid / "opt" / "new").stat().st_ino
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "opt")
    # The layers are untouched.
    assert (low / "etc" / "gone").read_text() == "gone" and (low / "opt" / "old" / "a").exists()


def test_links_copies_and_moves_lay_out_the_same_tree(tmp_path):
    # COPY --from (links), the microVM's flattened lower disks (copies) and an applied upper
    # (moves) are one function: the same stack gives the same tree; folders keep their times.
    import shutil
    import subprocess

    from tlimage.sandbox.qemu.disks import flatten_layers
    from tlimage.sandbox.upper import apply_upper

    low, top = tmp_path / "low", tmp_path / "top"
    (low / "etc" / "d").mkdir(parents=True)
    (low / "etc" / "gone").write_text("gone")
    (low / "etc" / "d" / "x").write_text("x")
    os.symlink("etc/d/x", low / "link")
    (top / "etc" / "d").mkdir(parents=True)
    os.setxattr(top / "etc" / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(top / "etc", "user.note", b"kept")
    (top / "etc" / "d" / "y").write_text("y")
    os.mknod(top / "etc" / "gone", stat.S_IFCHR, 0)
    for d in (low / "etc" / "d", top / "etc" / "d", top / "etc", low / "etc"):
        os.utime(d, ns=(1_000_000_000, 1_000_000_000))

    linked, flat, moved = (tmp_path / n for n in ("linked", "flat", "moved"))
    linked.mkdir()
    merge_lowers([low, top], linked)
    flatten_layers([low, top], flat)
    moved.mkdir()
    for layer in (low, top):
        subprocess.run(["cp", "-a", str(layer), str(tmp_path / "spent")], check=True)
        apply_upper(tmp_path / "spent", moved)
        shutil.rmtree(tmp_path / "spent")
    want = {"etc": "dir 755 0", "etc/d": "dir 755 0", "etc/d/y": "y", "link": "-> etc/d/x"}
    assert tree(linked) == tree(flat) == tree(moved) == want
    for out in (linked, flat):
        assert (out / "etc").stat().st_mtime_ns == 1_000_000_000
        assert os.getxattr(out / "etc", "user.note") == b"kept"
        assert not [n for n in os.listxattr(out / "etc" / "d") if ".overlay." in n]
    assert (flat / "etc" / "d" / "y").stat().st_ino == (top / "etc" / "d" / "y").stat().st_ino
    assert (flat / "link").lstat().st_ino != (low / "link").lstat().st_ino  # made afresh
