"""Registered images to and from OCI form: what export and push send, what import and pull
register."""

from __future__ import annotations

from typing import Any

from tlimage.builder.config import config_from_oci, config_to_oci
from tlimage.registry.db import ImageRecord, LayerRef, Manifest, Registry


def local_image(rec: ImageRecord, platform: str = "linux/amd64") -> Any:
    """A registered image as a `tlimage.oci.layout.LocalImage`."""
    from tlimage.oci.layout import LocalImage

    return LocalImage([(la.digest, la.diff_id) for la in rec.manifest.layers],
                      config_to_oci(rec.manifest.config), platform)  # fmt: skip


def register_pulled(img: Any, project: str, name: str, tag: str, *,
                    source: str | None = None) -> ImageRecord:  # fmt: skip
    """Register a pulled or imported image (`tlimage.oci.pull.PulledImage`) under name:tag."""
    manifest = Manifest(
        layers=tuple(LayerRef(la.digest, la.diff_id, la.size) for la in img.layers),
        config=config_from_oci(img.config).to_json(),
        base=f"{img.name}@{img.digest}",
    )
    return Registry().register(project, name, tag, manifest, source)


def registered_or_pulled(project: str, ref: str, *, cache_dir: Any = None,
                         platform: str = "linux/amd64", emit: Any = None,
                         registry_config: Any = None) -> str:  # fmt: skip
    """`ref` when it names an image registered in the project; otherwise a registry image,
    pulled and registered (as its last path component and tag, e.g. `debian:bookworm`) — the
    NAME:TAG to launch."""
    import re

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
        name = re.sub(r"[^A-Za-z0-9._-]", "-", parsed.repository.rsplit("/", 1)[-1])
        tag = parsed.tag or img.digest.split(":")[1][:12]
        rec = register_pulled(img, project, name, tag, source=ref)
    return rec.ref
