"""Layers a build knows but has not fetched yet.

A step that misses locally but is in a `--cache-from` registry cache is CACHED at once, without
its bytes: its layer enters the stage as a `Deferred` (the same for a seed base held there, and
for the layers of a registry image a stage starts from: resolving it fetches its manifest and
config only).
`need` fetches the layers of a list the first time something reads their files — a RUN, WORKDIR
or COPY that runs on top of them, a COPY --from or a mount of their stage, the final image — all
missing ones of the list in one parallel download. A stage nobody reads is never downloaded, so a
fresh machine fetches just the layers of the image it builds (BuildKit's lazy blobs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tlimage.registry.db import LayerRef


class Deferred:
    """The layer a cache key names, fetched on first need. `diff_id` (the uncompressed tar's
    sha256, from the cache map) is known before the bytes are."""

    __slots__ = ("key", "diff_id", "size", "what", "origin", "ref")

    def __init__(self, key: str, diff_id: str, size: int, what: str, origin: Any = None) -> None:
        self.key = key
        self.diff_id = diff_id
        self.size = size  # the compressed blob in the registry
        self.what = what  # for messages: the step or image
        self.origin = origin  # None: the --cache-from maps; else the registry image it is of
        self.ref: LayerRef | None = None

    def __repr__(self) -> str:
        return f"Deferred({self.what!r}, {self.key[:16]}…, fetched={self.ref is not None})"


Layer = LayerRef | Deferred


def need(layers: Sequence[Layer], fetch: Callable[[list[Deferred]], None]) -> list[LayerRef]:
    """`layers` with every Deferred fetched (`fetch` gets those not fetched yet, each once, and
    sets their `ref`)."""
    missing = list({id(la): la for la in layers if isinstance(la, Deferred) and la.ref is None}
                   .values())  # fmt: skip
    if missing:
        fetch(missing)
    out = []
    for la in layers:
        if isinstance(la, Deferred):
            assert la.ref is not None, la
            out.append(la.ref)
        else:
            out.append(la)
    return out
