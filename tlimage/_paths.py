"""Where tlimage keeps state that is not a cache: the registry and sandboxes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tlimage.errors import TlimageError

STATE_DIR_ENV = "TLIMAGE_STATE_DIR"
PROJECT_ENV = "TLIMAGE_PROJECT"
DEFAULT_PROJECT = "default"
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def state_dir() -> Path:
    """`$TLIMAGE_STATE_DIR`, else `$XDG_DATA_HOME/tlimage`, else `~/.local/share/tlimage`."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "tlimage"
    return Path.home() / ".local" / "share" / "tlimage"


def project_name(explicit: str | None = None) -> str:
    """The project that scopes image names: `--project`, else `$TLIMAGE_PROJECT`, else
    `default`."""
    name = explicit or os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT
    if not _PROJECT_RE.fullmatch(name):
        raise TlimageError(
            f"invalid project name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
        )
    return name
