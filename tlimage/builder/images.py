"""Registered images to and from OCI form: what export and push send, what import and pull
register."""

from __future__ import annotations

import re
from typing import Any

from tlimage.builder.config import config_from_oci, config_to_oci
from tlimage.registry.db import ImageRecord, LayerRef, Manifest, Registry


def local_image(rec: ImageRecord, platform: str = "linux/amd64") -> Any:
    """A registered image as a `tlimage.oci.layout.LocalImage`."""
    from tlimage.oci.layout import LocalImage

    return LocalImage([(la.digest, la.diff_id) for la in rec.manifest.layers],
                      config_to_oci(rec.manifest.config), platform)  # fmt: skip


def register_pulled(img: Any, project: str, name: str, tag: str, *, source: str | None = None,
                    replace: bool = True) -> ImageRecord:  # fmt: skip
    """Register a pulled or imported image (`tlimage.oci.pull.PulledImage`) under name:tag.
    Without `replace`, a name holding another image of another source is refused."""
    manifest = Manifest(
        layers=tuple(LayerRef(la.digest, la.diff_id, la.size) for la in img.layers),
        config=config_from_oci(img.config).to_json(),
        base=f"{img.name}@{img.digest}",
    )
    registry = Registry()
    held = None if replace else registry.taken(project, f"{name}:{tag}", source)
    if held is not None and _content(held.manifest) != _content(manifest):
        from tlimage.builder.loop import NameTaken

        raise NameTaken(f"{name}:{tag} in project {project!r} holds an image from "
                        f"{held.source or 'the Python API'}, not from {source}",
                        hint="pass --replace to register this one under that name anyway, or "
                        "choose another name with -n/--name")  # fmt: skip
    return registry.register(project, name, tag, manifest, source)


def registered_or_pulled(project: str, ref: str, *, cache_dir: Any = None,
                         platform: str = "linux/amd64", emit: Any = None,
                         registry_config: Any = None) -> str:  # fmt: skip
    """`ref` when it names an image registered in the project; otherwise a registry image,
    pulled and registered (as its last path component and tag, e.g. `debian:bookworm`) — the
    NAME:TAG to launch."""
    from tlimage.builder.bases import KNOWN_BASES
    from tlimage.errors import RegistryError

    if ref in KNOWN_BASES:
        return ref
    if "/" not in ref and "@" not in ref:
        try:
            if Registry().find(project, ref) is not None:
                return ref
        except RegistryError:
            pass
    from tlimage.builder.bases import pull_base
    from tlimage.cache.cache import LayerCache
    from tlimage.errors import OCIError
    from tlimage.oci.client import RegistryConfig
    from tlimage.oci.reference import parse

    try:
        parsed = parse(ref)
    except OCIError:
        Registry().get(project, ref)  # not a registry reference either: "no image NAME…"
        raise
    with LayerCache(cache_dir) as cache, cache.session(purpose="pull"):
        img, _, _ = pull_base(
            ref,
            cache,
            emit or (lambda _e: None),
            platform=platform,
            refresh=False,
            registry_config=registry_config or RegistryConfig.from_env(),
        )
        tag = parsed.tag or img.digest.split(":")[1][:12]
        # Its short name, unless an image of another source holds it: then the whole
        # reference's (a pull never replaces what the user built or imported).
        names = [_name(parsed.repository.rsplit("/", 1)[-1]),
                 _name(f"{parsed.registry}/{parsed.repository}")]  # fmt: skip
        registry = Registry()
        name = next((n for n in names if registry.taken(project, f"{n}:{tag}", ref) is None),
                    None)  # fmt: skip
        if name is None:
            from tlimage.builder.loop import NameTaken

            raise NameTaken(f"{ref}: {names[0]}:{tag} and {names[1]}:{tag} in project "
                            f"{project!r} hold images of other sources",
                            hint="build FROM it under a name of your choice with `tl sbx image "
                            "create`, or remove one of those images")  # fmt: skip
        rec = register_pulled(img, project, name, tag, source=ref)
    return rec.ref


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def _content(m: Manifest) -> tuple[Any, ...]:
    """What an image holds, wherever its layers came from: its trees and its config."""
    return tuple(la.diff_id for la in m.layers), m.config
