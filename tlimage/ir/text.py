"""The IR's text form (grammar: `grammar/ir.lark`) and its JSON form.

`parse_text(format_text(image)) == image` holds for every image, spans and force flags included;
digests are printed as comments and recomputed on the way in, never trusted from the text.
"""

from __future__ import annotations

import json
from typing import Any

from tlimage.errors import IRSyntaxError
from tlimage.ir.codec import IR_VERSION, DecodeError, step_from_obj, step_to_obj
from tlimage.ir.graph import ImageDef, Stage, StepMeta
from tlimage.source import Span

HEADER = "tlimage-ir"


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(", ", ": "))


def _span(span: Span) -> str:
    out = f"@ {_value(span.file)}:{span.line}:{span.col}"
    if span.end_line is not None and span.end_col is not None:
        out += f"-{span.end_line}:{span.end_col}"
    return out


def format_text(image: ImageDef, *, digests: bool = True) -> str:
    lines = [f"{HEADER} {IR_VERSION}"]
    head = f"image name={_value(image.name)} tag={_value(image.tag)}"
    if image.target is not None:
        head += f" target={_value(image.target)}"
    lines.append(head)
    for stage in image.stages:
        lines.append(f"stage {_value(stage.name)}")
        ds = image.step_digests(stage.name) if digests else [None] * len(stage.steps)
        for (step, meta), d in zip(stage.items(), ds, strict=True):
            obj = step_to_obj(step)
            parts = [obj.pop("op")]
            parts += [f"{k}={_value(v)}" for k, v in obj.items()]
            if meta.span is not None:
                parts.append(_span(meta.span))
            if meta.force:
                parts.append("!force")
            line = "  " + " ".join(parts)
            if d is not None:
                line += f"  # {d}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def parse_text(text: str, filename: str = "<ir>") -> ImageDef:
    from lark import Token, Tree
    from lark.exceptions import UnexpectedInput

    from tlimage import _grammar

    try:
        tree = _grammar.load("ir").parse(text)
    except UnexpectedInput as e:
        raise IRSyntaxError(
            _describe_unexpected(e), Span(filename, e.line, e.column), text=text
        ) from None

    def span_of(node: Tree | Token) -> Span:
        if isinstance(node, Token):
            return Span(filename, node.line or 1, node.column or 1)
        return Span(filename, node.meta.line, node.meta.column)

    def fail(msg: str, node: Tree | Token) -> IRSyntaxError:
        return IRSyntaxError(msg, span_of(node), text=text)

    def value(node: Tree) -> Any:
        kind = node.data
        if kind == "string":
            return json.loads(node.children[0])
        if kind == "number":
            return int(node.children[0])
        if kind in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[kind]
        if kind == "array":
            return [value(c) for c in node.children if c is not None]
        if kind == "object":
            obj = {}
            for pair in node.children:
                if pair is None:
                    continue
                key, val = pair.children
                obj[json.loads(key)] = value(val)
            return obj
        raise AssertionError(kind)

    def fields(nodes: list[Tree]) -> tuple[dict[str, Any], dict[str, Tree]]:
        out: dict[str, Any] = {}
        where: dict[str, Tree] = {}
        for f in nodes:
            key = str(f.children[0])[:-1]
            if key in out:
                raise fail(f"field {key!r} given twice", f)
            out[key] = value(f.children[1])
            where[key] = f
        return out, where

    header, image_node, *stage_nodes = tree.children
    version = int(header.children[0])
    if version != IR_VERSION:
        raise fail(
            f"IR version {version} is not supported; this tlimage reads version {IR_VERSION}",
            header,
        )
    head, head_at = fields(list(image_node.children))
    unknown = sorted(set(head) - {"name", "tag", "target"})
    if unknown:
        raise fail(f"unknown image field {unknown[0]!r}; allowed: name, tag, target",
                   head_at[unknown[0]])  # fmt: skip
    stages = []
    for st in stage_nodes:
        name_tok, *step_nodes = st.children
        steps, metas = [], []
        for sn in step_nodes:
            op_tok, *rest = sn.children
            span_node = next((c for c in rest if isinstance(c, Tree) and c.data == "span"), None)
            force = any(isinstance(c, Tree) and c.data == "force" for c in rest)
            body, at = fields([c for c in rest if isinstance(c, Tree) and c.data == "field"])
            try:
                steps.append(step_from_obj({"op": str(op_tok), **body}))
            except DecodeError as e:
                first = e.path.split(".")[0].split("[")[0]
                raise fail(e.message if first else str(e), at.get(first, op_tok)) from None
            metas.append(StepMeta(span=_parse_span(span_node) if span_node else None, force=force))
        try:
            stages.append(Stage(json.loads(name_tok), tuple(steps), tuple(metas)))
        except ValueError as e:
            raise fail(str(e), name_tok) from None
    try:
        return ImageDef(
            name=head.get("name", "default"),
            tag=head.get("tag", "latest"),
            target=head.get("target"),
            stages=tuple(stages),
        )
    except ValueError as e:
        raise fail(str(e), image_node) from None


def _parse_span(node: Any) -> Span:
    file_tok, *nums = (c for c in node.children if c is not None)
    ints = [int(n) for n in nums]
    end_line, end_col = (ints[2], ints[3]) if len(ints) == 4 else (None, None)
    return Span(json.loads(file_tok), ints[0], ints[1], end_line, end_col)


def _describe_unexpected(e: Any) -> str:
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

    if isinstance(e, UnexpectedEOF):
        return "unexpected end of input"
    if isinstance(e, UnexpectedToken):
        expected = sorted(e.accepts or e.expected)
        shown = ", ".join(_TOKEN_NAMES.get(x, x) for x in expected[:8])
        return f"unexpected {e.token!s:.40}; expected one of: {shown}"
    if isinstance(e, UnexpectedCharacters):
        return f"unexpected character {e.char!r}"
    return str(e)


_TOKEN_NAMES = {
    "KEY": "a field (name=value)",
    "OP": "a step (run, copy, env, ...)",
    "STRING": "a string",
    "STAGE": "'stage'",
    "AT": "'@'",
    "INT": "a number",
}


# -- JSON form -------------------------------------------------------------------------------


def to_json_obj(image: ImageDef) -> dict[str, Any]:
    """The IR as one JSON document (`--emit json`), digests included for readers' convenience."""
    stages = []
    for stage in image.stages:
        steps = []
        for (step, meta), d in zip(stage.items(), image.step_digests(stage.name), strict=True):
            obj = step_to_obj(step)
            obj["digest"] = d
            if meta.span is not None:
                obj["at"] = str(meta.span)
            if meta.force:
                obj["force"] = True
            steps.append(obj)
        stages.append({"name": stage.name, "steps": steps})
    out: dict[str, Any] = {"ir_version": IR_VERSION, "name": image.name, "tag": image.tag}
    if image.target is not None:
        out["target"] = image.target
    out["digest"] = image.digest()
    out["stages"] = stages
    return out
