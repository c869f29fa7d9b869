"""Seed base images as layers: the bases of the catalog (`tlimage.executor.catalog`:
debian-minimal, debian-systemd, debian-vnc, their ubuntu-* twins) and the tiny `busybox`.

The executor builds each base's root filesystem on the host (`tlimage.executor.bases`); here it
becomes one layer in the cache, found again by a key that names the tree's own key (suite, mirror,
packages, tool versions), so a changed recipe gives a new base and an unchanged one costs a
lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlimage.builder.config import ImageConfig
from tlimage.executor.catalog import NAMES as KNOWN_BASES  # noqa: F401 - re-exported
from tlimage.executor.catalog import spec as _spec
from tlimage.registry.db import ImageRecord, LayerRef, Manifest

INIT_LABEL = "org.tlimage.init"  # "systemd" on bases whose init is systemd


def base_cache_key(name: str) -> str:
    """The cache key of a seed base's layer: its recipe's key (suite, mirror, packages, tool
    versions), known before anything is built."""
    from tlimage.executor import bases

    spec = bases.catalog.spec(name)
    if spec is None:
        raise bases.BaseError(f"unknown base {name!r}; available: {', '.join(bases.BASES)}")
    return f"base:{name}:{bases.base_key(spec, bases.base_info(spec))}"


def base_config(name: str) -> ImageConfig:
    """The image config of seed base `name` (its env, command and init label)."""
    spec = _spec(name)
    assert spec is not None
    labels = ((INIT_LABEL, spec.init),) if spec.init != "none" else ()
    return ImageConfig(env=spec.env, cmd=spec.cmd, cmd_from_base=True, labels=labels)


def ensure_base(
    name: str,
    cache: Any,
    emit: Callable[[dict[str, Any]], None],
    cache_dir: Path | None,
) -> tuple[LayerRef, ImageConfig]:
    """The base's layer and config: found in the cache by the recipe's key, else the tree is
    built and stored as a layer. (A build with --cache-from looks in the registry cache first,
    `base_cache_key`: a fresh machine then never runs mmdebstrap.)"""
    from tlimage.executor import bases

    def progress(msg: str) -> None:
        emit({"event": "status", "message": msg})

    t0 = time.monotonic()
    key = base_cache_key(name)
    rec = cache.lookup(key)
    if rec is None:
        base = bases.ensure_base(name, cache_dir, progress=progress)
        if f"base:{name}:{base.key}" != key:  # the recipe changed in between: use the tree's
            key = f"base:{name}:{base.key}"
        rec = cache.lookup(key) or cache.store_dir(key, base.tree, description=f"base {name}")
        progress(f"base image {name} stored as a layer in {time.monotonic() - t0:.1f}s "
                 f"({rec.size / 1e6:.1f} MB compressed)")  # fmt: skip
    return LayerRef(rec.digest, rec.diff_id, rec.size), base_config(name)


def pull_base(ref: str, cache: Any, emit: Callable[[dict[str, Any]], None], *,
              platform: str, refresh: bool, registry_config: Any = None,
              label: str | None = None) -> tuple[Any, list[LayerRef], ImageConfig]:  # fmt: skip
    """A registry image as a base: (the `tlimage.oci.pull.PulledImage`, its layers, its
    config). Without `refresh` a reference resolved before is reused offline."""
    from tlimage.builder.config import config_from_oci
    from tlimage.oci import pull as oci_pull

    img = oci_pull.pull(ref, cache, platform=platform, refresh=refresh, config=registry_config,
                        progress=pull_progress(emit), label=label)  # fmt: skip
    layers = [LayerRef(la.digest, la.diff_id, la.size) for la in img.layers]
    return img, layers, config_from_oci(img.config)


def pull_progress(emit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """A pull's progress events, passed on with a status line at its start and end."""

    def progress(ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "pull_started":
            emit({"event": "status", "message": f"pulling {ev['ref']} ({ev['digest'][:19]}…, "
                  f"{_n(ev['layers'], 'layer')}, {ev['size'] / 1e6:.1f} MB)"})  # fmt: skip
        elif kind == "pull_done":
            emit({"event": "status", "message": f"pulled {ev['ref']}: {_n(ev['downloaded'], 'layer')}, "
                  f"{ev['bytes'] / 1e6:.1f} MB in {ev['duration']:.1f}s"})  # fmt: skip
        emit(ev)

    return progress


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def base_image(
    name: str, cache_dir: Path | None = None, emit: Callable[[dict[str, Any]], None] | None = None
) -> ImageRecord:
    """A catalog base as an (unregistered) image record a sandbox can boot: `tl sbx new`
    without --image, or --image debian-minimal when no image of that name is registered."""
    from tlimage.cache.cache import LayerCache

    with LayerCache(cache_dir) as cache, cache.session(purpose="base"):
        layer, config = ensure_base(name, cache, emit or (lambda _e: None), cache_dir)
    manifest = Manifest((layer,), config.to_json(), base=f"{name}@{layer.digest}")
    return ImageRecord(
        "", name, "latest", manifest.image_id(), manifest, f"base:{name}", time.time()
    )


class CatalogBases:
    """The base catalog as the runtime asks for it (`tlimage.runtime.BaseImages`): the catalog's
    bases, built on first use."""

    def default(self) -> tuple[str, str]:
        from tlimage.executor import catalog

        return catalog.default_base(), catalog.default_base_reason()

    def init(self, name: str) -> str | None:
        spec = _spec(name)
        return None if spec is None else spec.init

    def image(self, name: str, cache_dir: Path | None) -> ImageRecord:
        return base_image(name, cache_dir)
