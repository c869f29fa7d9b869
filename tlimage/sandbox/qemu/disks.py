"""ext4 disk images for the microVM: one read-only image per layer (cached, keyed by the tree's
metadata), flattened images when a VM has too few disk slots, and the sparse scratch disk.

Lower images are cached in `<cache>/executor-v1/ext4/<tree key>.img`, keyed by the tree's
metadata (paths, modes, owners, sizes, mtimes, link targets, xattrs): lowers are immutable by
contract, so a changed file must change its size or mtime. More than MAX_LOWER_DISKS lowers are
flattened, bottom ones first, into one image.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

from tlimage import _layout
from tlimage._fs import lay_out_layers
from tlimage.errors import ExecutorError
from tlimage.sandbox.qemu.provision import bucket_dir, require_tool
from tlimage.sandbox.upper import walk, xattrs

# 24 virtio-mmio transports in QEMU's microvm; scratch, serial, net and rng take 4.
MAX_DISKS = 20
MAX_LOWER_DISKS = 16
# Part of every cached image's name: bump when make_ext4's output changes for the same tree.
IMAGE_FORMAT = "i2"
DEFAULT_SCRATCH = 64 << 30  # sparse: costs only what the steps write


def tree_key(root: Path) -> tuple[str, int, int]:
    """(metadata digest, bytes of file data, number of entries) of a directory tree."""
    import xxhash

    h = xxhash.xxh3_128()
    size = count = 0
    for rel, st in walk(root):
        path = os.path.join(root, rel)
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        rec = (
            rel,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_rdev,
            link,
            [(n, v.hex()) for n, v in xattrs(path)],
        )
        h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
        if stat.S_ISREG(st.st_mode):
            size += (st.st_size + 4095) // 4096 * 4096
        count += 1
    return h.hexdigest(), size, count


def make_ext4(src: Path, dest: Path, data_bytes: int, entries: int, *,
              root_owner: tuple[int, int] = (0, 0),
              root_mode: int | None = None) -> None:  # fmt: skip
    """mke2fs -d: copies modes, owners, times, hard links, devices (whiteouts) and xattrs
    (the opaque marker). No journal: the image is only ever mounted read-only."""
    mke2fs = require_tool("mke2fs", "to build the base disk images for the microVM")
    size = max(64 << 20, data_bytes * 2 + entries * 8192 + (32 << 20))
    for _attempt in range(3):
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        with open(dest, "wb") as f:
            f.truncate(size)
        p = subprocess.run(
            [
                mke2fs,
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-I",
                "256",
                "-m",
                "0",
                "-N",
                str(entries + 256),
                "-O",
                "^has_journal,^resize_inode",
                "-E",
                f"root_owner={root_owner[0]}:{root_owner[1]}",
                "-L",
                "tl-lower",
                "-d",
                str(src),
                str(dest),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode == 0:
            if not (src / "lost+found").exists():
                _drop_lost_found(dest)
            if root_mode is not None and root_mode != 0o755:  # mke2fs -d leaves the root 0755
                _debugfs(dest, f"sif / mode 0{stat.S_IFDIR | root_mode:o}")
            return
        if "No space left" not in p.stderr and "Could not allocate" not in p.stderr:
            break
        size *= 2
    raise ExecutorError(f"mke2fs -d {src} failed: {p.stderr.strip()[-500:]}")


def _drop_lost_found(image: Path) -> None:
    """mke2fs always makes /lost+found; a step must see the layers' root, nothing more."""
    _debugfs(image, "rmdir /lost+found")


def _debugfs(image: Path, request: str) -> None:
    debugfs = require_tool("debugfs", "to edit the base disk images for the microVM")
    p = subprocess.run(
        [debugfs, "-w", "-R", request, str(image)], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise ExecutorError(f"debugfs {request} {image} failed: {p.stderr.strip()}")


def flatten_layers(lowers: list[Path], dest: Path) -> None:
    """Applies overlay-style layers bottom to top onto `dest` (whiteouts delete, opaque dirs
    replace), the root and every folder with its layer's owner, mode, xattrs and times.
    Regular files are hard-linked from the layers when possible: the result is read by mke2fs
    only and then deleted, never modified."""
    dest.mkdir(parents=True, exist_ok=True)
    lay_out_layers(lowers, dest, place="copy", root_meta=True)


def lower_images(lowers: tuple[Path, ...], cache_dir: Path | None = None, *,
                 max_disks: int = MAX_LOWER_DISKS) -> list[Path]:  # fmt: skip
    """One cached ext4 image per lower (bottom first); excess bottom lowers are flattened."""
    root = bucket_dir(_layout.EXT4, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    groups: list[list[Path]] = [[p] for p in lowers]
    if len(groups) > max_disks:
        cut = len(groups) - max_disks + 1
        groups = [[p for g in groups[:cut] for p in g], *groups[cut:]]
    images = []
    for group in groups:
        keys = [tree_key(p) for p in group]
        name = keys[0][0] if len(group) == 1 else "flat-" + _digest([k[0] for k in keys])
        name = f"{IMAGE_FORMAT}-{name}"
        img = root / f"{name}.img"
        if not img.exists():
            tmp = root / f".{name}.{os.getpid()}.tmp"
            with tempfile.TemporaryDirectory(prefix=".flat-", dir=root) as flat:
                src = group[0]
                if len(group) > 1:
                    src = Path(flat) / "tree"
                    flatten_layers(group, src)
                make_ext4(src, tmp, sum(k[1] for k in keys), sum(k[2] for k in keys))
            os.replace(tmp, img)
        images.append(img)
    return images


def _digest(parts: list[str]) -> str:
    import xxhash

    return xxhash.xxh3_128("\n".join(parts).encode()).hexdigest()


def make_scratch(path: Path, size: int = DEFAULT_SCRATCH) -> None:
    mke2fs = require_tool("mke2fs", "to make the microVM's scratch disk")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(
        [
            mke2fs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            "-L",
            "tl-scratch",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
