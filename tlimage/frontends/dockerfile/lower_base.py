"""What the lowering's per-feature modules share: the table of stages and the error they raise.

`Problem` (from `frontends.problem`) is an error that does not know its place yet; `lower.py`
turns it into a `DockerfileInstructionError` pointing at `needle` (the first of them found in the
instruction's lines) or at the keyword.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile._gostr import go_lower
from tlimage.frontends.problem import Problem

__all__ = ["Problem", "StageInfo", "StageTable"]


@dataclass(frozen=True, slots=True)
class StageInfo:
    index: int
    name: str  # as declared, lower case; "" for an unnamed stage
    ir_name: str  # the IR stage's name: `name`, else `stage-N` (`main` for a lone stage)


# strconv.Atoi: an optional sign and decimal digits.
_ATOI = re.compile(r"[+-]?[0-9]+\Z")


class StageTable:
    """The stages of a Dockerfile, found by name (case-insensitive, named stages only, as
    BuildKit's `findStateByName`) or by index (`COPY --from=0`)."""

    def __init__(self, stages: Sequence[ins.Stage]) -> None:
        taken = {s.name for s in stages if s.name}
        infos: list[StageInfo] = []
        for st in stages:
            if st.name:
                ir_name = st.name
            else:
                ir_name = "main" if len(stages) == 1 else f"stage-{st.index}"
                while ir_name in taken:  # a stage may be *named* stage-1
                    ir_name += "_"
                taken.add(ir_name)
            infos.append(StageInfo(st.index, st.name, ir_name))
        self.stages = tuple(infos)
        self._by_name = {s.name: s for s in infos if s.name}

    def __len__(self) -> int:
        return len(self.stages)

    def by_name(self, name: str) -> StageInfo | None:
        return self._by_name.get(go_lower(name))

    def names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def lookup(self, ref: str, *, by_index: bool) -> StageInfo | None:
        """The stage `ref` names (an index too when `by_index`, as `COPY --from=0`), or None
        when it names no stage (it is an image then). The caller checks that the stage comes
        before the one that reads from it."""
        if by_index and _ATOI.match(ref):
            index = int(ref)
            if not 0 <= index < len(self.stages):
                raise Problem(f"invalid stage index {index}", "--from")
            return self.stages[index]
        return self.by_name(ref)
