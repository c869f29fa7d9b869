"""An image definition: a DAG of stages, each a chain of steps; and the digests over it.

Identity and metadata are kept apart. A step's digest covers the IR version, its parent's digest,
its canonical encoding, and the digests of the stages it reads from (`From(stage=)`,
`Copy(from_=<stage>)`, a RUN mount `from=<stage>`), with stage *names* replaced by those digests
so renaming a stage changes nothing. `StepMeta` (source span, force flag) travels beside each step
and never enters a digest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import xxhash

from tlimage.ir.codec import IR_VERSION, canonical, step_to_obj
from tlimage.ir.steps import BindMount, CacheMount, Copy, From, Run, Step
from tlimage.source import Span

_DIGEST_DOMAIN = b"tlimage-ir\x00v%d\x00" % IR_VERSION


@dataclass(frozen=True, slots=True)
class StepMeta:
    """What travels beside a step: where it came from and how to treat it; never in a digest."""

    span: Span | None = None
    force: bool = False  # rebuild this step even on a cache hit


@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[Step, ...]
    meta: tuple[StepMeta, ...] = ()

    def __post_init__(self) -> None:
        if not self.steps or not isinstance(self.steps[0], From):
            raise ValueError(f"stage {self.name!r} must start with a From step")
        if any(isinstance(s, From) for s in self.steps[1:]):
            raise ValueError(f"stage {self.name!r} has a From step after its first step")
        if not self.meta:
            object.__setattr__(self, "meta", tuple(StepMeta() for _ in self.steps))
        if len(self.meta) != len(self.steps):
            raise ValueError("meta must have one entry per step")

    @property
    def base(self) -> From:
        return self.steps[0]  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[Step, StepMeta]]:
        return zip(self.steps, self.meta, strict=True)

    def stage_refs(self) -> tuple[str, ...]:
        """Names of other stages this stage reads from, in step order."""
        refs: list[str] = []
        for step in self.steps:
            refs.extend(step_stage_refs(step))
        return tuple(dict.fromkeys(refs))


@dataclass(frozen=True)
class ImageDef:
    """A whole image: stages in definition order; `target` names the stage that is the image
    (default: the last one). `name`/`tag` are how it is registered; they are not in any digest."""

    name: str
    stages: tuple[Stage, ...]
    tag: str = "latest"
    target: str | None = None
    _digests: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("an image needs at least one stage")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate stage name {sorted(dup)[0]!r}")
        if self.target is not None and self.target not in names:
            raise ValueError(f"target {self.target!r} is not a stage; stages: {', '.join(names)}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def target_stage(self) -> Stage:
        return self.stage(self.target) if self.target else self.stages[-1]

    @cached_property
    def stage_names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.stages)

    def needed_stages(self) -> tuple[Stage, ...]:
        """The stages the target depends on (itself included), dependencies first, in
        definition order otherwise. Stages the target does not reach are skipped."""
        need: set[str] = set()

        def visit(name: str) -> None:
            if name in need:
                return
            need.add(name)
            for ref in self.stage(name).stage_refs():
                if ref in self.stage_names:
                    visit(ref)

        visit(self.target_stage.name)
        return tuple(s for s in self.stages if s.name in need)

    def parallel_groups(self) -> tuple[tuple[str, ...], ...]:
        """Needed stages grouped into waves: every stage in a wave depends only on earlier waves,
        so the stages of one wave can build in parallel."""
        level: dict[str, int] = {}
        for s in self.needed_stages():
            deps = [level[r] for r in s.stage_refs() if r in level]
            level[s.name] = 1 + max(deps, default=-1)
        waves: dict[int, list[str]] = {}
        for name, lv in level.items():
            waves.setdefault(lv, []).append(name)
        return tuple(tuple(waves[k]) for k in sorted(waves))

    # -- digests ---------------------------------------------------------------------------

    def step_digests(self, stage: str) -> tuple[str, ...]:
        """The chained digest of each step of `stage`."""
        if stage not in self._digests:
            self._compute(stage, ())
        return self._digests[stage]

    def digest(self) -> str:
        """The image's identity: the digest of the target stage's last step."""
        return self.step_digests(self.target_stage.name)[-1]

    def _compute(self, name: str, visiting: tuple[str, ...]) -> None:
        if name in visiting:
            cycle = " -> ".join((*visiting, name))
            raise ValueError(f"stages depend on each other in a cycle: {cycle}")
        st = self.stage(name)
        resolve: dict[str, str] = {}
        for ref in st.stage_refs():
            if ref in self.stage_names:
                if ref not in self._digests:
                    self._compute(ref, (*visiting, name))
                resolve[ref] = self._digests[ref][-1]
        parent = ""
        out = []
        for step in st.steps:
            parent = step_digest(parent, step, resolve)
            out.append(parent)
        self._digests[name] = tuple(out)


def step_stage_refs(step: Step) -> list[str]:
    """The stage-or-image names a step reads from (the caller decides which are stages)."""
    if isinstance(step, From) and step.stage is not None:
        return [step.stage]
    if isinstance(step, Copy) and step.from_ is not None:
        return [step.from_]
    if isinstance(step, Run):
        return [m.from_ for m in step.mounts
                if isinstance(m, BindMount | CacheMount) and m.from_ is not None]  # fmt: skip
    return []


def step_digest(parent: str, step: Step, stages: dict[str, str] | None = None) -> str:
    """xxh3-128 over the domain tag, the parent digest and the step's canonical encoding.

    References to stages in `stages` (name -> final digest) are encoded by digest, not name.
    """
    obj = step_to_obj(step)
    stages = stages or {}
    if isinstance(step, From) and step.stage is not None:
        obj["stage"] = {"digest": stages.get(step.stage, step.stage)}
    elif isinstance(step, Copy) and step.from_ in stages:
        obj["from"] = {"digest": stages[step.from_]}
    elif isinstance(step, Run) and step.mounts and stages:
        for m_obj, m in zip(obj.get("mounts", []), step.mounts, strict=True):
            if isinstance(m, BindMount | CacheMount) and m.from_ in stages:
                m_obj["from"] = {"digest": stages[m.from_]}
    h = xxhash.xxh3_128(_DIGEST_DOMAIN)
    h.update(parent.encode())
    h.update(b"\x00")
    h.update(canonical(obj))
    return h.hexdigest()
