"""The base image catalog as the runtime sees it.

The runtime keeps sandboxes alive; it does not build images. A sandbox from a catalog base (`tl
sbx new` with no --image, or `--image debian-minimal` with no image of that name registered)
gets its image from a `BaseImages` handed in by the runtime's caller: `Sandbox.create(bases=…)`,
or once per process with `use_bases(…)`. `tlimage.Sandbox` and the `tl` CLI hand in the
builder's (`tlimage.builder.bases.CatalogBases`: the catalog's bases, built on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class BaseImages(Protocol):
    def default(self) -> tuple[str, str]:
        """(the default base's name, one line saying why it is the default)."""
        ...

    def init(self, name: str) -> str | None:
        """The init of the catalog base `name` ("none", "systemd"); None: not a base."""
        ...

    def image(self, name: str, cache_dir: Path | None) -> Any:
        """The base as an (unregistered) `registry.ImageRecord`, built on first use."""
        ...


_default: BaseImages | None = None


def use_bases(bases: BaseImages | None) -> None:
    """The catalog `Sandbox.create` uses when it is given none (None: no catalog)."""
    global _default
    _default = bases


def current(bases: BaseImages | None = None) -> BaseImages | None:
    return bases if bases is not None else _default
