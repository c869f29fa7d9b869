"""Pass 3 of the JSON front end: each operation calls the Python DSL method of the same name, and
step spans are replaced by places in the JSON file (or by the SDK's recorded `source`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.errors import DSLError
from tlimage.frontends.jsonform.jsonparse import (
    Document,
    JSONDocumentError,
    Path_,
    format_path,
    parse,
    show,
)
from tlimage.frontends.jsonform.schema import Invalid, validator
from tlimage.source import Span

# -- pass 3: lowering -------------------------------------------------------------------------


@dataclass
class _Context:
    """Where errors and step spans point. `doc` positions are used when `in_text` (a JSON file a
    person reads); `source` fields written by an SDK exporter take over for step spans always,
    and for errors when the JSON text is not a file (exported on the fly)."""

    doc: Document
    in_text: bool
    _source_files: dict[str, str] = field(default_factory=dict)  # shown path -> path as given

    def fail(self, err: Invalid | str, path: Path_ = (), *, at_key: bool = False,
             hint: str | None = None) -> JSONDocumentError:  # fmt: skip
        if isinstance(err, Invalid):
            path, message, at_key, hint = err.path, err.message, err.at_key, err.hint or hint
        else:
            message = err
        if self.in_text:
            span, text = self.doc.span(path, key=at_key), self.doc.text
        else:  # the SDK source the operation came from, read now (linecache may be stale)
            span = self.source_near(path)
            text = _read_text(self._source_files.get(span.file, span.file)) if span else None
        return JSONDocumentError(
            message, format_path(path), file=self.doc.file, span=span, text=text, hint=hint
        )

    def step_span(self, obj: dict[str, Any], path: Path_) -> Span | None:
        return self._source_span(obj) or (self.doc.span(path) if self.in_text else None)

    def source_near(self, path: Path_) -> Span | None:
        """The `source` of the innermost image or operation that encloses `path`."""
        node_at: list[Any] = [self.doc.value]
        for part in path:
            try:
                node_at.append(node_at[-1][part])
            except (KeyError, IndexError, TypeError):
                break
        for node in reversed(node_at):
            span = self._source_span(node)
            if span is not None:
                return span
        return None

    def _source_span(self, node: Any) -> Span | None:
        src = node.get("source") if isinstance(node, dict) else None
        if not isinstance(src, dict) or not isinstance(src.get("file"), str):
            return None
        shown = _display_path(src["file"])
        self._source_files[shown] = src["file"]
        return Span(shown, int(src.get("line", 1)), int(src.get("column", 1)))


def _read_text(file: str) -> str | None:
    try:
        return Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _display_path(file: str) -> str:
    """Absolute paths under the working directory are shown relative to it."""
    if not os.path.isabs(file):
        return file
    cwd = os.getcwd()
    return os.path.relpath(file, cwd) if file.startswith(cwd + os.sep) else file


def load_json_images(path: str | Path) -> list[ir.ImageDef]:
    """All images of a JSON image document. The path is kept as given, so spans read as the
    user typed it."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise JSONDocumentError(
            f"the file is not UTF-8 (byte {e.start}, line {line})", file=str(p)
        ) from None
    return load_json_text(text, str(p))


def load_json_text(text: str, file: str, *, in_text: bool = True) -> list[ir.ImageDef]:
    """Images from JSON text. `in_text=False` is for JSON produced on the fly (SDK exporters):
    errors then point at the `source` of the operation they are in, not into the text."""
    doc = parse(text, file)
    ctx = _Context(doc, in_text)
    bad = ir.codec.find_surrogate(doc.value)
    if bad is not None:
        raise ctx.fail(f"the string {bad[1]!r} holds a lone surrogate (\\ud800-\\udfff), which is "
                       "not text", bad[0])  # fmt: skip
    try:
        validator().validate(doc.value)
    except Invalid as e:
        raise ctx.fail(e) from None
    return _lower(doc.value, ctx)


def images_of(value: dict[str, Any]) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """(path, image object) for each image of a validated document."""
    if "images" in value or "schema_version" in value:
        for i, img in enumerate(value["images"]):
            yield ("images", i), img
    else:
        yield (), value


def _lower(value: dict[str, Any], ctx: _Context) -> list[ir.ImageDef]:
    out: list[ir.ImageDef] = []
    seen: dict[str, Path_] = {}
    for path, obj in images_of(value):
        name = obj.get("name", "default")
        if name in seen:
            raise ctx.fail(
                f"{show(name)} is already the name of {format_path(seen[name]) or 'an image'}",
                (*path, "name") if "name" in obj else path,
                hint="give each image of a document its own name",
            )
        seen[name] = path
        out.append(_lower_image(obj, path, ctx))
    return out


def _lower_image(obj: dict[str, Any], path: Path_, ctx: _Context) -> ir.ImageDef:
    from tlimage.frontends import dsl

    def call(fn: Callable[[], dsl.Image], at: Path_) -> dsl.Image:
        try:
            return fn()
        except DSLError as e:  # the schema let through something the DSL refuses
            raise ctx.fail(_METHOD_PREFIX.sub("", e.message), at, hint=e.hint) from None

    img = call(lambda: dsl.Image(obj.get("name", "default"), obj.get("tag", "latest"),
                                 obj.get("base_image", dsl.DEFAULT_BASE_IMAGE)), path)  # fmt: skip
    spans: list[Span | None] = []
    for i, op in enumerate(obj.get("operations", ())):
        op_path = (*path, "operations", i)
        _check_mounts(op, op_path, ctx)
        before = len(img.steps)
        img = call(lambda op=op, img=img: _apply(img, op), op_path)
        if len(img.steps) > before:  # an empty RUN/COPY/EXPOSE/VOLUME adds no step
            spans.append(ctx.step_span(op, op_path))
    lowered = img.to_ir()
    stage = lowered.stages[0]
    # The base's errors (an unknown registry image) point at its `base_image` member.
    base_at = (*path, "base_image") if "base_image" in obj else path
    metas = (
        ir.StepMeta(span=ctx.step_span(obj, base_at)),
        *(ir.StepMeta(span=s, force=m.force) for s, m in zip(spans, stage.meta[1:], strict=True)),
    )
    return ir.ImageDef(
        name=lowered.name,
        tag=lowered.tag,
        stages=(ir.Stage(stage.name, stage.steps, metas),),
    )


_METHOD_PREFIX = re.compile(r"^\w+\(\): ")


def _int(v: Any) -> Any:
    """Integral numbers as int (JSON Schema's "integer" admits 1.0; the DSL wants an int)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _apply(img: Any, op: dict[str, Any]) -> Any:
    """One operation as the DSL call of the same name; the document is already validated."""
    name, args, opts = op["op"], op["args"], op.get("options") or {}
    if name == "RUN":
        return img.run(args, opts)
    if name in ("COPY", "ADD"):
        return getattr(img, name.lower())(args[0], args[1], opts)
    if name == "ENV":
        return img.env(args[0], args[1])
    if name == "WORKDIR":
        return img.workdir(args[0])
    if name == "USER":
        return img.user(_int(args[0]))
    if name in ("ENTRYPOINT", "CMD"):
        return getattr(img, name.lower())(args[0] if opts.get("shell") else args)
    if name == "LABEL":
        return img.label(args[0], args[1])
    if name == "ARG":
        return img.arg(*args)
    if name == "EXPOSE":
        return img.expose(*(_int(a) for a in args))
    if name == "SHELL":
        return img.shell(args)
    if name == "STOPSIGNAL":
        return img.stopsignal(_int(args[0]))
    if name == "HEALTHCHECK":
        command = None if not args else args[0] if opts.get("shell") else args
        timing = {k: opts[k] for k in ("interval", "timeout", "start_period", "start_interval")
                  if k in opts}  # fmt: skip
        if "retries" in opts:
            timing["retries"] = _int(opts["retries"])
        return img.healthcheck(command, **timing)
    if name == "VOLUME":
        return img.volume(*args)
    raise AssertionError(f"operation {name} passed validation but has no lowering")


def _check_mounts(op: dict[str, Any], path: Path_, ctx: _Context) -> None:
    """Each mount (a spec string or an object) read by the parser every front end shares, so
    that a bad one is reported at its own JSON path (`operations[2].options.mounts[0]`)."""
    from tlimage.frontends.mounts import mount_from_user
    from tlimage.frontends.problem import Problem

    opts = op.get("options") or {}
    if op["op"] != "RUN" or not opts.get("mounts"):
        return
    for i, m in enumerate(opts["mounts"]):
        try:
            mount_from_user(m)
        except Problem as e:
            raise ctx.fail(e.message, (*path, "options", "mounts", i), hint=e.hint) from None
