"""Locating and loading the lark grammars in `grammar/` (in a wheel: `tlimage/_grammar/`)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lark import Lark

_HERE = Path(__file__).resolve().parent


def grammar_dir() -> Path:
    for candidate in (_HERE / "_grammar", _HERE.parent / "grammar"):
        if (candidate / "common.lark").is_file():
            return candidate
    raise FileNotFoundError("tlimage's grammar folder is missing from this installation")


@cache
def load(name: str, **options: object) -> Lark:
    """The LALR parser for `grammar/<name>.lark`, built once per process (and cached on disk by
    lark, keyed by the grammar's text)."""
    from lark import Lark

    opts = {
        "parser": "lalr",
        "propagate_positions": True,
        "maybe_placeholders": True,
        "cache": True,
    }
    opts.update(options)
    return Lark.open(str(grammar_dir() / f"{name}.lark"), **opts)
