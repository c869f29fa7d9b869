"""What goes into a step's cache key — the one place that says so.

    key = xxh3-128( "tlimage-key" | BUILDER_VERSION
                  | parent key                      (chains everything before the step)
                  | the step's canonical IR encoding (stage references as digests)
                  | env in scope                    (ENV and ARG values the step runs with)
                  | platform                        (e.g. linux/amd64)
                  | files                           (COPY/ADD: each selected file's digest) )

Included, each with a test that changing it changes the key: the parent, the step definition,
env and build-arg values in scope, the platform, the builder version, and for COPY/ADD each
selected file's relative path, type, exec bit, bytes and symlink target (see `filehash`).

Excluded, each with a test that it does not: source locations and the force flag (metadata, not
identity); the proxy variables (`HTTP_PROXY`, … in either case, as BuildKit's ExecOp.CacheMap
blanks them) since they change how bytes are fetched, not which; file mtimes, owners and the
umask; secrets, which never enter a key or a layer — a secret mount enters by its id only.

`Components` keeps the inputs by name so that `--explain` can say which one changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from tlimage.ir.codec import canonical

# Bump when the way a step is executed or captured changes (not the IR encoding: that has
# IR_VERSION inside the step encoding). A bump invalidates every cached layer, deliberately.
BUILDER_VERSION = 1

PROXY_VARS = frozenset(
    v
    for name in ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy")
    for v in (name, name.upper())
)


@dataclass(frozen=True)
class Components:
    """The named inputs of one key."""

    parent: str
    step: dict[str, Any]
    env: tuple[tuple[str, str], ...] = ()
    platform: str = "linux/amd64"
    files: tuple[tuple[str, str], ...] = ()
    builder: int = BUILDER_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)

    def key(self) -> str:
        h = xxhash.xxh3_128(b"tlimage-key\x00")
        h.update(canonical(self.to_json()))
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "builder": self.builder,
            "parent": self.parent,
            "step": self.step,
            "env": [list(p) for p in self.env],
            "platform": self.platform,
            "files": [list(p) for p in self.files],
            "extra": dict(sorted(self.extra.items())),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Components:
        return cls(
            parent=obj["parent"],
            step=obj["step"],
            env=tuple((k, v) for k, v in obj["env"]),
            platform=obj["platform"],
            files=tuple((k, v) for k, v in obj["files"]),
            builder=obj["builder"],
            extra=dict(obj.get("extra", {})),
        )


def step_components(
    parent: str,
    step_obj: Mapping[str, Any],
    *,
    env: Mapping[str, str] | tuple[tuple[str, str], ...] = (),
    platform: str = "linux/amd64",
    files: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Components:
    """Components for a step. `step_obj` is its canonical plain object (see `ir.step_to_obj`,
    with stage references replaced by digests); `env` the variables it runs with; `files` the
    relative path -> digest of every file it reads from the build context."""
    pairs = env.items() if isinstance(env, Mapping) else env
    kept = tuple(sorted((k, v) for k, v in pairs if k not in PROXY_VARS))
    return Components(
        parent=parent,
        step=_without_proxies(dict(step_obj)),
        env=kept,
        platform=platform,
        files=tuple(sorted((files or {}).items())),
        extra=dict(extra or {}),
    )


def _without_proxies(step: dict[str, Any]) -> dict[str, Any]:
    if step.get("op") == "run" and "env" in step:
        step["env"] = [p for p in step["env"] if p[0] not in PROXY_VARS]
        if not step["env"]:
            del step["env"]
    return step


def explain(old: Components | None, new: Components) -> str:
    """One line naming what differs between the last build's inputs and this one's."""
    if old is None:
        return "no earlier build of this image reached this step"
    if old.builder != new.builder:
        return f"tlimage's builder version changed ({old.builder} -> {new.builder})"
    if old.platform != new.platform:
        return f"platform changed ({old.platform} -> {new.platform})"
    if old.step != new.step:
        return f"step definition changed: {_short(old.step)} -> {_short(new.step)}"
    if old.env != new.env:
        a, b = dict(old.env), dict(new.env)
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"env {k} changed: {_val(a.get(k))} -> {_val(b.get(k))}"
    if old.files != new.files:
        a, b = dict(old.files), dict(new.files)
        changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        what = [
            f"{k} ({'added' if k not in a else 'removed' if k not in b else 'changed'})"
            for k in changed[:3]
        ]
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"files changed: {', '.join(what)}{more}"
    if old.extra != new.extra:
        for k in sorted(set(old.extra) | set(new.extra)):
            if old.extra.get(k) != new.extra.get(k):
                return f"{k} changed: {_val(old.extra.get(k))} -> {_val(new.extra.get(k))}"
    if old.parent != new.parent:
        return "an earlier step changed"
    return "inputs are the same; the cached layer is missing or was pruned"


def _short(step: Mapping[str, Any]) -> str:
    text = json.dumps(step, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _val(v: str | None) -> str:
    return "(unset)" if v is None else repr(v)
