"""tlimage: build sandbox images from Python, TypeScript/JSON or Dockerfiles; run sandboxes.

    from tlimage import Image
    image = Image("data-tools").run("pip install pandas").env("APP_ENV", "prod")

The public names below are imported on first use, so `import tlimage` (and `tl --help`) stays
cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlimage.builder import build, build_image
    from tlimage.errors import TlimageError
    from tlimage.frontends import load
    from tlimage.frontends.dsl import Image, function
    from tlimage.ir import ImageDef
    from tlimage.runtime import Sandbox

_EXPORTS = {
    "Image": "tlimage.frontends.dsl",
    "function": "tlimage.frontends.dsl",
    "ImageDef": "tlimage.ir",
    "TlimageError": "tlimage.errors",
    "load": "tlimage.frontends",
    "build": "tlimage.builder",
    "build_image": "tlimage.builder",
    "Sandbox": "tlimage.runtime",
}

__all__ = [
    "Image", "ImageDef", "Sandbox", "TlimageError", "build", "build_image", "function", "load",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlimage' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    if name == "Sandbox":
        _wire_runtime()
    globals()[name] = value
    return value


def _wire_runtime() -> None:
    """`tlimage.Sandbox` knows the base catalog: the runtime does not build images, so the
    builder's catalog is handed to it here, where both may be imported."""
    from tlimage.builder.bases import CatalogBases
    from tlimage.runtime import use_bases

    use_bases(CatalogBases())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
