"""Front ends: each turns one kind of source file into `ir.ImageDef`s.

`load(path)` picks the front end by the file: `*.py` (Python DSL), `*.json` (JSON image
documents), `*.ts`/`*.mts`/`*.mjs`/`*.js` (TypeScript SDK, exported to JSON by Node), and
Dockerfiles (`Dockerfile`, `*.Dockerfile`, `Dockerfile.*`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tlimage.errors import DiscoveryError

if TYPE_CHECKING:
    from tlimage.ir import ImageDef

KINDS = ("python", "json", "typescript", "dockerfile")


def kind_of(path: Path) -> str:
    name = path.name
    suffix = path.suffix.lower()
    if suffix == ".py":
        return "python"
    if suffix == ".json":
        return "json"
    if suffix in (".ts", ".mts", ".mjs", ".js", ".cjs"):
        return "typescript"
    if name == "Dockerfile" or name.startswith("Dockerfile.") or suffix == ".dockerfile":
        return "dockerfile"
    if name.lower().endswith("dockerfile") or name.lower().startswith("containerfile"):
        return "dockerfile"
    raise DiscoveryError(
        f"{path}: cannot tell what kind of image file this is",
        hint="use a .py (Python DSL), .json, .ts/.mjs/.js (TypeScript SDK) file or a Dockerfile",
    )


def load(path: str | Path, **options: object) -> list[ImageDef]:
    """All images defined in `path`. Options go to the front end (Dockerfiles: build_args,
    target, name). `kind` overrides what the file name says (`tl sbx image create -f NAME`
    reads a Dockerfile whatever its name)."""
    kind = options.pop("kind", None)
    p = Path(path)
    if not p.exists():
        raise DiscoveryError(f"{p}: no such file")
    if p.is_dir():
        if (p / "Dockerfile").is_file():
            p = p / "Dockerfile"
        else:
            raise DiscoveryError(f"{p}: is a folder; name an image file in it")
    kind = kind or kind_of(p)
    if kind == "python":
        from tlimage.frontends.pyfile import load_python_images

        return load_python_images(p)
    if kind == "json":
        from tlimage.frontends.jsonform import load_json_images

        return load_json_images(p)
    if kind == "typescript":
        from tlimage.frontends.typescript import load_typescript_images

        return load_typescript_images(p)
    from tlimage.frontends.dockerfile.lower import load_dockerfile_image

    return [load_dockerfile_image(p, **options)]  # type: ignore[arg-type]


def select(images: list[ImageDef], name: str | None, source: str | Path) -> ImageDef:
    """The image called `name`, or the only one when `name` is None."""
    if not images:
        raise DiscoveryError(
            f"{source}: no image found",
            hint="define an Image at module level or attach one with @function(image=...)",
        )
    names = ", ".join(sorted(i.name for i in images))
    if name is None:
        if len(images) > 1:
            raise DiscoveryError(
                f"{source}: defines several images ({names})",
                hint="pick one with --image-name NAME",
            )
        return images[0]
    for img in images:
        if img.name == name:
            return img
    raise DiscoveryError(f"{source}: no image named {name!r}; available: {names}")
