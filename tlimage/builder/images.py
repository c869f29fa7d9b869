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
