"""What goes into a cache key: each included input changes it, each excluded one does not."""

from __future__ import annotations

import dataclasses

import pytest

from tlimage import Image, ir
from tlimage.cache import keys

BASE = dict(
    parent="p" * 32,
    step_obj={"op": "run", "command": ["make"]},
    env={"A": "1"},
    platform="linux/amd64",
    files={"src/a.py": "f-:abc"},
)


def key(**changes: object) -> str:
    args = {**BASE, **changes}
    return keys.step_components(
        args["parent"], args["step_obj"], env=args["env"], platform=args["platform"],
        files=args["files"],
    ).key()  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"parent": "q" * 32},
        {"step_obj": {"op": "run", "command": ["make all"]}},
        {"env": {"A": "2"}},
        {"env": {"A": "1", "B": "1"}},
        {"platform": "linux/arm64"},
        {"files": {"src/a.py": "f-:abd"}},  # bytes
        {"files": {"src/a.py": "fx:abc"}},  # exec bit
        {"files": {"src/b.py": "f-:abc"}},  # path
        {"files": {"src/a.py": "l-:abc"}},  # type
        {"files": {"src/a.py": "f-:abc", "src/new.py": "f-:0"}},
    ],
)
def test_included_inputs_change_the_key(change: dict) -> None:
    assert key(**change) != key()


def test_builder_version_changes_the_key() -> None:
    c = keys.step_components("p", {"op": "run"})
    assert dataclasses.replace(c, builder=c.builder + 1).key() != c.key()


@pytest.mark.parametrize("var", sorted(keys.PROXY_VARS))
def test_proxy_variables_do_not_change_the_key(var: str) -> None:
    assert key(env={"A": "1", var: "http://proxy:3128"}) == key()
    with_env = {"op": "run", "command": ["make"], "env": [[var, "http://proxy"]]}
    assert key(step_obj=with_env) == key()


def test_env_order_does_not_change_the_key() -> None:
    assert key(env={"A": "1", "B": "2"}) == key(env={"B": "2", "A": "1"})


def test_source_location_and_force_do_not_change_the_ir_digest() -> None:
    a = Image("x").run("make").to_ir()
    stage = a.stages[0]
    moved = ir.ImageDef("x", (ir.Stage("main", stage.steps, tuple(
        ir.StepMeta(span=None, force=True) for _ in stage.steps)),))  # fmt: skip
    assert moved.digest() == a.digest()


def test_explain_names_each_kind_of_change() -> None:
    old = keys.step_components("p", {"op": "run"}, env={"A": "1"}, files={"a": "f-:1"})
    assert keys.explain(None, old) == "no earlier build of this image reached this step"
    assert keys.explain(old, keys.step_components("p", {"op": "run"}, env={"A": "2"},
                                                  files={"a": "f-:1"})) == (
        "env A changed: '1' -> '2'")  # fmt: skip
    new = keys.step_components("p", {"op": "run"}, env={"A": "1"}, files={"b": "f-:1"})
    assert keys.explain(old, new) == "files changed: a (removed), b (added)"
    new = keys.step_components("q", {"op": "run"}, env={"A": "1"}, files={"a": "f-:1"})
    assert keys.explain(old, new) == "an earlier step changed"
    assert (
        keys.explain(old, old) == "inputs are the same; the cached layer is missing or was pruned"
    )
