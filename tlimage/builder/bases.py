"""Seed base images, built once by the tool itself and kept as layers in the cache.

`debian-minimal` and `ubuntu-minimal` carry a PEP 668-managed system Python 3 with pip and no
systemd; `busybox` is a few-megabyte base for tests and quick experiments. Each is built from
packages (see `tlimage.executor.bases`) the first time it is needed, stored as one layer, and
found again by a key naming the recipe's version, so a recipe change builds a new base.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlimage.builder.config import DEFAULT_PATH, ImageConfig
from tlimage.registry.db import LayerRef

_PY_ENV = (("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8"))

# name -> (recipe version, config)
KNOWN_BASES: dict[str, tuple[int, ImageConfig]] = {
    "debian-minimal": (1, ImageConfig(env=_PY_ENV, cmd=("/bin/bash",), cmd_from_base=True)),
    "ubuntu-minimal": (1, ImageConfig(env=_PY_ENV, cmd=("/bin/bash",), cmd_from_base=True)),
    "busybox": (1, ImageConfig(cmd=("/bin/sh",), cmd_from_base=True)),
}


def base_key(name: str) -> str:
    version, _ = KNOWN_BASES[name]
    return f"base:{name}:v{version}"


def ensure_base(
    name: str, store: Any, index: Any, emit: Callable[[dict[str, Any]], None]
) -> tuple[LayerRef, ImageConfig]:
    """The base's layer, building and storing it on first use."""
    from tlimage.cache.layer import layer_from_dir
    from tlimage.executor.bases import build_base

    _, config = KNOWN_BASES[name]
    key = base_key(name)
    hit = index.get(key)
    if hit is not None and hit.digest is not None and store.has(hit.digest):
        return LayerRef(hit.digest, hit.diff_id, hit.size), config
    emit({"event": "status", "message": f"building base image {name} (first use only)"})
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"tlimage-base-{name}-", dir=_scratch(store)))
    try:
        root = tmp / "rootfs"
        build_base(name, root, log=lambda line: emit(
            {"event": "build_log", "stage": "base", "index": 0, "stream": "stderr",
             "data": line if line.endswith("\n") else line + "\n"}))  # fmt: skip
        info = layer_from_dir(root, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index.put(key, info.digest, info.diff_id, info.size, f"base {name}")
    emit({"event": "status", "message": f"base image {name} ready in "
          f"{time.monotonic() - t0:.1f}s ({info.size / 1e6:.1f} MB compressed)"})  # fmt: skip
    return LayerRef(info.digest, info.diff_id, info.size), config


def _scratch(store: Any) -> str:
    d = Path(store.root) / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)
