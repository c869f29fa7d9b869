"""What a RUN mount names, and what it adds to the step's cache key: context files a bind shows,
and the identity of a stage or image a bind or cache reads `from=`."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.errors import BuildError


class MountError(BuildError):
    """A RUN mount cannot be set up (bad option, missing secret, missing source)."""


# -- what the mounts add to a key -----------------------------------------------------------------


def key_inputs(builder: Any, step: ir.Run, file_digests: Callable[[list[str]], dict[str, str]]
               ) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """(files, extra) for `keys.step_components`: context files a bind shows (path -> token, as
    `file_digests` gives them for context-relative paths) and, per mount `from=` a stage or
    image, that source's identity."""
    files: dict[str, str] = {}
    extra: dict[str, str] = {}
    for spec in step.mounts:
        if spec.type == "ssh" and spec.required:
            raise ssh_error(spec)
        if spec.type == "bind" and spec.from_ is None:
            files.update(file_digests([context_rel(spec.source)]))
        if spec.type in ("bind", "cache") and spec.from_ is not None:
            extra[f"mount {spec.target} from"] = from_source(builder, spec.from_).identity
    return files, extra


def ssh_error(spec: ir.SshMount) -> MountError:
    return MountError(
        f"RUN --mount=type=ssh (id {spec.id!r}, required) needs an SSH agent, and tlimage does "
        "not forward one into build steps",
        hint="fetch with a token instead: --mount=type=secret,id=token,env=GIT_TOKEN and "
        "`--secret id=token,env=GIT_TOKEN`",
    )


def context_rel(source: str) -> str:
    rel = posixpath.normpath("/" + source).lstrip("/")
    return rel or "."


@dataclass(frozen=True)
class Source:
    """A stage or image a mount reads `from=`: its layers (bottom first; one still in a
    --cache-from registry cache is fetched on first use, `tlimage.builder.lazy`) and its
    identity for keys (a built stage's chain key, an image's id, a seed base's diff_id)."""

    stack: tuple[Any, ...]
    identity: str

    def digests(self, builder: Any) -> tuple[str, ...]:
        return tuple(la.digest for la in builder.need(self.stack))

    def layers(self, builder: Any) -> tuple[Path, ...]:
        """The layers as overlay-style folders, unpacked on first use."""
        from tlimage.cache.unpacked import unpacked_layer

        return tuple(unpacked_layer(builder.store, d) for d in self.digests(builder))


def from_source(builder: Any, name: str) -> Source:
    if name in builder.stages:
        state = builder.stages[name]
        return Source(tuple(state.layers), f"stage {name} {state.key}")
    if name in builder.image.stage_names:
        raise MountError(f"mount from stage {name!r}: that stage has not been built")
    # A registered image, a seed base, or a registry image (pulled; its digest is the identity).
    src = builder.image_source(name)
    return Source(tuple(src.layers), f"image {src.desc}")
