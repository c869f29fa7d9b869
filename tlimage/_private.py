"""Folders only their owner may enter: the cache root, the state root, the run root.

They hold unpacked image trees (set-uid binaries, files baked into images), sandbox uppers and
build scratch; a host user who could walk into them could run or read those. `private_dir`
makes such a folder 0700 when it creates it, and tightens one it finds wider when it is ours
(owned by the effective uid); a wider folder owned by someone else is named in one notice.
Sandboxes with a user namespace still reach their layers: the overlay is mounted by host root
(its capabilities kept while it acts as the range's first id) and the sandbox's processes only
see the mounted tree, never a host path below these roots.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o700
_checked: set[str] = set()  # folders made or tightened by this process already


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` made (with its missing parents) and kept `0700`: returns it."""
    p = Path(path)
    key = str(p)
    if key in _checked:
        if p.is_dir():
            return p
        _checked.discard(key)
    p.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)  # parents: the default mode
    st = os.stat(p)
    if stat.S_IMODE(st.st_mode) & 0o077:
        if st.st_uid == os.geteuid():
            os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700 | PRIVATE_MODE)
        else:
            from tlimage import notices  # lazily: rare

            notices.once(
                f"private-dir:{key}", f"{st.st_uid}:{stat.S_IMODE(st.st_mode):o}",
                f"{key} is mode {stat.S_IMODE(st.st_mode):o} and owned by uid {st.st_uid}, not "
                f"by us: other host users may read image trees and sandbox files below it "
                f"(chmod 700 {key})",
            )  # fmt: skip
    _checked.add(key)
    return p
