"""Paths in the build context and in cache folders, resolved as if each were `/` (no link leads
out), and the whiteout layer that hides what the ignore rules hide from a bind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tlimage.builder.mounts.spec import MountError

# -- the build context --------------------------------------------------------------------------


def resolve_in(root: str, rel: str) -> str:
    """`rel` resolved inside `root` as if it were `/` (symlinks included, none leaving it);
    returns the real relative path ("" for the root). Raises FileNotFoundError."""
    from tlimage._fs import resolve_in_root

    try:
        return resolve_in_root(root, rel)
    except FileNotFoundError:
        raise
    except OSError:  # a symlink loop
        raise FileNotFoundError(rel) from None


def mkdirs_in(root: str, rel: str) -> str:
    """`mkdir -p rel` inside `root`, with symlinks resolved inside `root` as `resolve_in` does;
    returns the real relative path of the folder."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for k in range(1, len(parts) + 1):
        try:
            resolve_in(root, "/".join(parts[:k]))
        except FileNotFoundError:
            parent = resolve_in(root, "/".join(parts[: k - 1]))
            new = os.path.join(root, parent, parts[k - 1])
            if os.path.lexists(new):
                raise MountError(f"cache mount source {rel!r}: {'/'.join(parts[:k])} is a link "
                                 "to nothing inside the cache") from None  # fmt: skip
            os.mkdir(new)
    real = resolve_in(root, "/".join(parts))
    if not os.path.isdir(os.path.join(root, real)):
        raise MountError(f"cache mount source {rel!r} is not a directory in the cache")
    return real


def ignored_below(ctx: str, real: str, matcher: Any) -> list[str]:
    """Paths under the context folder `real` (relative to the context) that the ignore rules
    hide, each the top of a hidden subtree. Same rules as `cache.filehash` (a folder excluded
    with `!` exceptions below it stays, showing only the exceptions)."""
    if not matcher:
        return []
    out: list[str] = []

    def walk(rel: str, hits: list[bool] | None) -> bool:
        any_visible = False
        path = os.path.join(ctx, rel) if rel else ctx
        with os.scandir(path) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            c_rel = f"{rel}/{child.name}" if rel else child.name
            excluded, c_hits = matcher.evaluate(c_rel, hits)
            if child.is_dir(follow_symlinks=False):
                if excluded and not matcher.has_exclusions:
                    out.append(c_rel)
                    continue
                mark = len(out)
                inner = walk(c_rel, c_hits)
                if excluded and not inner:
                    del out[mark:]
                    out.append(c_rel)
                    continue
                any_visible = True
            elif excluded:
                out.append(c_rel)
            else:
                any_visible = True
        return any_visible

    if not os.path.isdir(os.path.join(ctx, real)):
        return []
    hits = matcher.evaluate(real, None)[1] if real else None
    walk(real, hits)
    return out


def make_whiteouts(ctx: Path, dest: Path, hidden: Iterable[str]) -> None:
    """An overlay-style layer that hides `hidden` (context-relative paths) when stacked over
    `ctx`. Its folders copy the context's mode and owner: in an overlay the top layer's folder
    attributes win."""
    dest.mkdir(parents=True)
    for rel in hidden:
        parts = rel.split("/")
        for k in range(1, len(parts)):
            d = dest.joinpath(*parts[:k])
            if not d.is_dir():
                d.mkdir()
                st = os.lstat(ctx.joinpath(*parts[:k]))
                os.chown(d, st.st_uid, st.st_gid)
                os.chmod(d, stat.S_IMODE(st.st_mode))
        os.mknod(dest / rel, stat.S_IFCHR | 0o000, 0)
    st = os.lstat(ctx)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
