from __future__ import annotations

import pytest

from tlimage import ir
from tlimage.errors import IRSyntaxError


def two_stage(build_name: str = "build") -> ir.ImageDef:
    return ir.ImageDef(
        "app",
        (
            ir.Stage(build_name, (ir.From(image="debian-minimal"), ir.Run(command=("make",)))),
            ir.Stage("unused", (ir.From(image="debian-minimal"), ir.Run(command=("true",)))),
            ir.Stage(
                "final",
                (
                    ir.From(image="debian-minimal"),
                    ir.Copy(sources=("/out",), dest="/app", from_=build_name),
                ),
            ),  # fmt: skip
        ),
    )


def test_renaming_a_stage_keeps_digests() -> None:
    assert two_stage("build").digest() == two_stage("compile").digest()


def test_a_change_in_a_dependency_stage_changes_the_dependent() -> None:
    a = two_stage()
    b = ir.ImageDef(
        "app",
        (
            ir.Stage("build", (ir.From(image="debian-minimal"), ir.Run(command=("make all",)))),
            *a.stages[1:],
        ),
    )
    assert a.step_digests("final")[0] == b.step_digests("final")[0]  # From does not read build
    assert a.digest() != b.digest()


def test_unreached_stages_are_skipped_and_waves_are_parallel() -> None:
    img = two_stage()
    assert [s.name for s in img.needed_stages()] == ["build", "final"]
    three = ir.ImageDef(
        "x",
        (
            ir.Stage("a", (ir.From(image="b1"),)),
            ir.Stage("b", (ir.From(image="b2"),)),
            ir.Stage("c", (ir.From(stage="a"), ir.Copy(sources=("/x",), dest="/", from_="b"))),
        ),
    )
    assert three.parallel_groups() == (("a", "b"), ("c",))


def test_stage_cycle_is_reported() -> None:
    img = ir.ImageDef(
        "x",
        (ir.Stage("a", (ir.From(stage="b"),)), ir.Stage("b", (ir.From(stage="a"),))),
    )
    with pytest.raises(ValueError, match="cycle"):
        img.digest()


def test_stage_must_start_with_from() -> None:
    with pytest.raises(ValueError, match="must start with a From"):
        ir.Stage("s", (ir.Run(command=("x",)),))
    with pytest.raises(ValueError, match="exactly one of"):
        ir.From()


def test_default_fields_are_omitted_from_the_encoding() -> None:
    assert ir.step_to_obj(ir.Run(command=("ls",))) == {"op": "run", "command": ["ls"]}
    assert ir.canonical(ir.step_to_obj(ir.Env(vars=(("b", "1"), ("a", "2"))))) == (
        b'{"op":"env","vars":[["b","1"],["a","2"]]}'
    )


TEXT = """tlimage-ir 2
image name="x" tag="latest"
stage "main"
  from image="debian-minimal"
  run command=["ls"]
"""


@pytest.mark.parametrize(
    ("broken", "message", "line", "col"),
    [
        (TEXT.replace("command=", "comand="), "unknown field 'comand'; allowed: command", 5, 7),
        (TEXT.replace('["ls"]', '"ls"'), "expected a list, got a string", 5, 7),
        (TEXT.replace("run ", "jump "), "unknown op 'jump'", 5, 3),
        (TEXT.replace("tlimage-ir 2", "tlimage-ir 9"), "IR version 9 is not supported", 1, 1),
        (TEXT.replace('stage "main"', "stage main"), "unexpected main", 3, 7),
        (TEXT + '  run network="wifi"\n', "'wifi' is not allowed; allowed: 'default'", 6, 7),
        (TEXT + '  from image="again"\n', "has a From step after its first step", 3, 7),
    ],
)
def test_text_errors_point_at_the_place(broken: str, message: str, line: int, col: int) -> None:
    with pytest.raises(IRSyntaxError) as info:
        ir.parse_text(broken, "img.ir")
    err = info.value
    assert message in str(err)
    assert (err.span.line, err.span.col) == (line, col)
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"img.ir:{line}:{col}: ")
    assert rendered[2].index("^") == len(f"{line:>4} | ") + col - 1


def test_comments_and_digests_in_text_are_ignored() -> None:
    img = ir.parse_text(TEXT.replace('["ls"]', '["ls"]  # deadbeef # more'))
    assert img.stages[0].steps[1] == ir.Run(command=("ls",))
