from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT
from tlimage import Image
from tlimage.errors import DSLError, JSONFormError
from tlimage.frontends import jsonform
from tlimage.frontends.jsonform import JSONDocumentError, load_json_text, parse
from tlimage.frontends.jsonform import lower as jsonform_lower


def test_schema_text_is_the_published_file() -> None:
    text = jsonform.schema_text()
    obj = json.loads(text)
    assert obj["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert obj["title"].endswith(f"schema_version {jsonform.SCHEMA_VERSION}")
    # The repository's schema/ folder shows the same file (a link, not a copy).
    assert (ROOT / "schema" / jsonform.SCHEMA_FILE).read_text() == text


def test_parser_keeps_values_and_positions() -> None:
    text = '{\n  "a": [1, 2.5, -3e2, "x\\u00e9", true, null],\n  "b": {"c": {}}\n}'
    doc = parse(text, "f.json")
    assert doc.value == json.loads(text)
    assert type(doc.value["a"][0]) is int and type(doc.value["a"][1]) is float
    assert str(doc.span(("a", 3))) == "f.json:2:23"
    assert str(doc.span(("b", "c"))) == "f.json:3:14"
    assert str(doc.span(("b",), key=True)) == "f.json:3:3"
    # A path that does not exist falls back to the nearest enclosing value.
    assert str(doc.span(("b", "c", "missing"))) == "f.json:3:14"


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ('{"a": 1,}', "trailing comma before '}'", "1:8"),
        ('{"a": 1 "b": 2}', "expected ',' or '}' after a field", "1:9"),
        ("[1, 2", "a list is not closed", "1:6"),
        ('{"a": 01}', "invalid number", "1:7"),
        ('{"a": 1e999}', "number is too large", "1:7"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number", "1:7"),
        ('{"a": "x\\q"}', "invalid escape", "1:9"),
        ('{"a": 1} x', "unexpected text after the end", "1:10"),
        ('{"a": undefined}', "JSON spells it null", "1:7"),
        ("{a: 1}", "expected a field name in double quotes", "1:2"),
        ('{"a": 1 /* c */}', "comments are not allowed", "1:9"),
        ("[" * 300 + "]" * 300, "nested more than 256 levels deep", "1:257"),
    ],
)
def test_syntax_errors_are_located(text: str, message: str, where: str) -> None:
    with pytest.raises(JSONDocumentError) as info:
        parse(text, "f.json")
    assert message in info.value.message
    assert str(info.value).startswith(f"f.json:{where}: invalid JSON:")
    assert "^" in str(info.value)  # the offending line and a caret


def test_byte_order_mark_and_crlf() -> None:
    text = (
        '\ufeff{"type": "image",\r\n "name": "a",\r\n "operations": [{"op": "RUN", "args": ["x"]}]}'
    )
    [img] = load_json_text(text, "f.json")
    assert str(img.target_stage.meta[1].span) == "f.json:3:17"


def test_errors_carry_path_file_and_hint() -> None:
    text = json.dumps({"type": "image", "name": "a",
                       "operations": [{"op": "RUN", "args": ["x"], "options": {"nework": "none"}}]})  # fmt: skip
    with pytest.raises(JSONFormError) as info:
        load_json_text(text, "image.json")
    err = info.value
    assert err.path == "operations[0].options.nework"
    assert err.file == "image.json"
    assert err.hint == 'did you mean "network"?'
    assert "allowed: env, force, mounts, network, user, workdir" in err.message


def test_steps_point_at_their_operation_objects() -> None:
    text = (
        '{"schema_version": 1, "images": [\n'
        '  {"name": "a", "operations": [\n'
        '    {"op": "RUN", "args": []},\n'
        '    {"op": "RUN", "args": ["x"], "options": {"force": true}},\n'
        '      {"op": "ENV", "args": ["K", "v"]}\n'
        "  ]}\n"
        "]}"
    )
    [img] = load_json_text(text, "d/image.json")
    metas = img.target_stage.meta
    assert [str(m.span) for m in metas] == ["d/image.json:2:3", "d/image.json:4:5",
                                            "d/image.json:5:7"]  # fmt: skip
    assert [m.force for m in metas] == [False, True, False]


def test_lowering_is_the_dsl() -> None:
    doc = {"type": "image", "name": "x", "base_image": "ubuntu-minimal", "operations": [
        {"op": "RUN", "args": ["a", "b"], "options": {"env": {"K": 1}, "mounts": ["type=cache,target=/c"]}},
        {"op": "COPY", "args": [["s1", "s2"], "/d"], "options": {"chmod": "0755", "exclude": "*.pyc"}},
        {"op": "HEALTHCHECK", "args": ["x"], "options": {"shell": True, "interval": 2}},
        {"op": "EXPOSE", "args": [80.0, "443/UDP"]},
    ]}  # fmt: skip
    [got] = load_json_text(json.dumps(doc), "f.json")
    want = (
        Image("x", base_image="ubuntu-minimal")
        .run(["a", "b"], options={"env": {"K": 1}, "mounts": ["type=cache,target=/c"]})
        .copy(["s1", "s2"], "/d", options={"chmod": "0755", "exclude": "*.pyc"})
        .healthcheck("x", interval=2)
        .expose(80, "443/udp")
        .to_ir()
    )
    assert got.digest() == want.digest()
    assert got.target_stage.steps == want.target_stage.steps


@pytest.mark.parametrize(
    "mount",
    [
        'type=cache,"target=/a,b"',  # a quoted CSV field: the target is "/a,b"
        {"type": "cache", "target": "/a,b"},
        "type=secret,id=tok,env=TOKEN",
        {"type": "cache", "target": "/c", "mode": 0o700, "uid": 1},
        "type=ssh",
    ],
)
def test_json_and_dsl_read_mounts_alike(mount: object) -> None:
    doc = {
        "type": "image",
        "name": "x",
        "operations": [{"op": "RUN", "args": ["make"], "options": {"mounts": [mount]}}],
    }
    [got] = load_json_text(json.dumps(doc), "f.json")
    want = Image("x").run(["make"], options={"mounts": [mount]}).to_ir()
    assert got.target_stage.steps == want.target_stage.steps


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ("type=cache,target=rel", "the target must be an absolute path"),
        ('type=cache,target="/a', 'bare " in non-quoted-field'),
        ("type=bind,target=/x,sharing=locked", "invalid cache sharing set for bind mount"),
    ],
)
def test_json_and_dsl_refuse_mounts_alike(mount: str, message: str) -> None:
    doc = {
        "type": "image",
        "name": "x",
        "operations": [{"op": "RUN", "args": ["make"], "options": {"mounts": [mount]}}],
    }
    with pytest.raises(JSONDocumentError) as info:
        load_json_text(json.dumps(doc), "f.json")
    assert info.value.path == "operations[0].options.mounts[0]"
    assert message in info.value.message
    with pytest.raises(DSLError) as dsl:
        Image("x").run(["make"], options={"mounts": [mount]})
    assert dsl.value.message.endswith(info.value.message)


def test_exported_json_points_errors_at_the_sdk_source(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.ts").write_text("const a = 1;\nconst img = new Image({name: 'a'})\n"
                                       "  .env('BAD KEY', 'v');\n")  # fmt: skip
    doc = {"schema_version": 1, "images": [{
        "type": "image", "name": "a",
        "source": {"file": str(tmp_path / "image.ts"), "line": 2, "column": 13},
        "operations": [{"op": "ENV", "args": ["BAD KEY", "v"],
                        "source": {"file": str(tmp_path / "image.ts"), "line": 3, "column": 4}}],
    }]}  # fmt: skip
    with pytest.raises(JSONDocumentError) as info:
        load_json_text(json.dumps(doc), "image.ts", in_text=False)
    text = str(info.value)
    assert text.startswith(
        'image.ts:3:4: images[0].operations[0].args[0]: "BAD KEY" is not allowed'
    )
    assert "  .env('BAD KEY', 'v');" in text  # the TypeScript line, not the JSON


def test_a_dsl_refusal_past_the_schema_is_still_a_json_path_error() -> None:
    # The schema and the DSL agree on everything the tests know of; should they ever differ,
    # the DSL's refusal comes out at the operation's JSON path, not at a Python call site.
    doc = parse('{"type": "image", "name": "a", "operations": [{"op": "RUN", "args": ["x"]}]}',
                "f.json")  # fmt: skip
    doc.value["operations"][0]["options"] = {"network": "bridge"}  # not validated
    with pytest.raises(JSONDocumentError) as info:
        jsonform_lower._lower(doc.value, jsonform_lower._Context(doc, True))
    assert info.value.path == "operations[0]"
    assert info.value.message.startswith("options['network'] is 'bridge'; allowed")
    assert str(info.value).startswith("f.json:1:47:")


def test_validator_refuses_a_schema_keyword_it_does_not_implement() -> None:
    with pytest.raises(ValueError, match="'uniqueItems'"):
        jsonform.SchemaValidator({"properties": {"a": {"uniqueItems": True}}})


def test_json_schema_integers_include_integral_floats() -> None:
    v = jsonform.validator()
    assert v.is_valid(3.0, {"type": "integer"})
    assert not v.is_valid(True, {"type": "integer"})
    assert not v.is_valid(1, {"const": True})
    assert v.is_valid(1.0, {"const": 1})


def test_json_fixture_folders_exist() -> None:
    assert (FIXTURES / "json").is_dir() and (FIXTURES / "json-negative").is_dir()
