"""Option types shared by the image and sandbox commands."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Isolation(StrEnum):
    """Where build steps and sandboxes run (`auto`: the microVM when KVM works)."""

    auto = "auto"
    microvm = "microvm"
    namespace = "namespace"


ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", envvar="TLIMAGE_PROJECT",
                 help="Project that scopes image and sandbox names (default: 'default')."),
]  # fmt: skip
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", envvar="TLIMAGE_CACHE_DIR", help="Layer cache folder."),
]
