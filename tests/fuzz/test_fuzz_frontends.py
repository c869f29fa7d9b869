"""Generated Dockerfile, JSON and DSL inputs: accepted (and then digested and printed as IR), or
rejected with a located error from the error tree. Bounded: a fixed number of examples each, no
deadline, no shrinking database. Each hypothesis example is also mutated a few times with its
own seeded random (VARIANTS inputs per example), which costs far less than generating anew."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import COUNTS
from tlimage import ir
from tlimage.errors import DSLError, JSONFormError, SourceError, TlimageError

pytestmark = pytest.mark.fuzz

EXAMPLES = 1200
VARIANTS = 3  # inputs per example: the generated one, then mutations of it
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))  # fmt: skip


def accepted(kind: str, images: list[ir.ImageDef]) -> None:
    """An accepted input must also digest and print without error."""
    for image in images:
        for stage in image.stages:
            parent = ""
            for step in stage.steps:
                parent = ir.step_digest(parent, step)
        ir.format_text(image)
    COUNTS[(kind, "accepted")] += 1


def rejected(kind: str, e: TlimageError, located: bool) -> None:
    assert located, f"{kind}: error without a location: {e!r}"
    str(e)
    e.render()
    COUNTS[(kind, "rejected")] += 1


# -- Dockerfiles -------------------------------------------------------------------------------

_WORDS = ["busybox", "scratch", "AS", "a", "b", "$A", "${A:-x}", "${A:?}", "\\", "'", '"', "[",
          "]", '["sh","-c","x"]', "[\"a\"", "<<EOF", "<<-E", "EOF", "E", "/x", "./y", "*.txt",
          "--from=a", "--from=", "--chown=1:1", "--chmod=755", "--chmod=x", "--link",
          "--mount=type=cache,target=/c", "--mount=cache,target=/x", "--mount=type=bind",
          "--mount=type=secret,id=s", "--mount=type=tmpfs,size=x", "--mount=", "--network=none",
          "--network=x", "--checksum=sha256:00", "--platform=$X", "--interval=nan",
          "--interval=1s", "--retries=-1", "--start-period=9999999999h", "NONE", "CMD",
          "caf\xe9", "\ud800", "\x00", "\t", "=", "A=1", "A=", "=1", "80/tcp", "65536", "-1",
          "1e400", "nan", "http://127.0.0.1:9/x.tar", "#", "# escape=`", "# syntax=x", "`"]  # fmt: skip
_KEYWORDS = ["FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
             "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
             "MAINTAINER", "from", "run", "BOGUS", ""]  # fmt: skip
_line = st.builds(lambda k, ws, cont: k + " " + " ".join(ws) + (" \\" if cont else ""),
                  st.sampled_from(_KEYWORDS), st.lists(st.sampled_from(_WORDS), max_size=5),
                  st.booleans())  # fmt: skip
_dockerfile = st.one_of(
    st.lists(_line, max_size=8).map(lambda ls: "\n".join(["FROM busybox", *ls]) + "\n"),
    st.lists(_line, max_size=6).map("\n".join),
    st.text(max_size=80),
)


def _mutate_text(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    op = rng.randrange(4)
    if op == 0 and lines:
        rng.shuffle(lines)
    elif op == 1:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(_KEYWORDS) + " "
                     + " ".join(rng.choices(_WORDS, k=rng.randrange(4))))  # fmt: skip
    elif op == 2 and text:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(_WORDS) + text[i + 1 :]
    else:
        return text[: rng.randrange(len(text) + 1)]
    return "\n".join(lines)


@FUZZ
@given(_dockerfile, st.booleans(), st.randoms(use_true_random=False))
def test_dockerfiles(text: str, as_bytes: bool, rng: random.Random) -> None:
    for i in range(VARIANTS):
        one_dockerfile(text if i == 0 else _mutate_text(text, rng), as_bytes)


def one_dockerfile(text: str, as_bytes: bool) -> None:
    from tlimage.frontends.dockerfile.lower import compile_dockerfile

    source: str | bytes = text
    if as_bytes:
        source = text.encode("utf-8", "surrogateescape" if "\ud800" not in text else "replace")
        source = source.replace(b"caf\xc3\xa9", b"caf\xe9")  # a non-UTF-8 byte, as Latin-1 has
    try:
        image = compile_dockerfile(source, "Dockerfile")
    except SourceError as e:
        rejected("dockerfile", e, e.span is not None or "Dockerfile" in str(e))
    except TlimageError as e:
        rejected("dockerfile", e, "Dockerfile" in str(e))
    else:
        accepted("dockerfile", [image])


# -- JSON documents ----------------------------------------------------------------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from(["", "x", "/a", "busybox", "type=cache,target=/x",
                                     "cache,target=/x", "\ud800", "caf\xe9", "1000:1000", "755",
                                     "sha256:00", "none", "default", "u+x"]),
                    st.text(max_size=12))  # fmt: skip
_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["type", "target", "source", "id", "from", "env", "user",
                                     "mounts", "network", "chown", "chmod", "x", "readonly",
                                     "size", "mode", "uid"]), inner, max_size=3)),
    max_leaves=5)  # fmt: skip
_OPS = [
    "RUN",
    "ENV",
    "COPY",
    "ADD",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "ARG",
    "SHELL",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "run",
    "PIP_INSTALL",
    "BOGUS",
]
_str = st.one_of(
    st.sampled_from(["x", "/a", "a.txt", "echo hi", "A", "1", "1000", "/d/"]),
    _scalar.filter(lambda v: isinstance(v, str)),
)
_args = st.lists(_str, min_size=1, max_size=3)
_op = st.fixed_dictionaries(
    {"op": st.sampled_from(_OPS), "args": st.one_of(_args, _args, _args, _value)},
    optional={"options": st.one_of(_value, st.dictionaries(
        st.sampled_from(["env", "user", "workdir", "mounts", "network", "force", "from",
                         "chown", "chmod", "checksum", "exclude", "link", "parents"]),
        _value, max_size=3))})  # fmt: skip
# Mostly well-formed around the hostile parts, so that accepted documents are exercised too.
_image = st.fixed_dictionaries(
    {"name": st.one_of(st.just("a"), st.just("b"), st.just("c"), _scalar),
     "base_image": st.one_of(st.just("busybox"), st.just("busybox"), st.just("scratch"), _scalar),
     "operations": st.lists(_op, max_size=4)},
    optional={"tag": _scalar})  # fmt: skip
_versioned = st.builds(lambda imgs, v: {"schema_version": v, "images": imgs},
                       st.lists(_image, min_size=1, max_size=2),
                       st.sampled_from([1, 1, 1, 1, 1, 1, 1, 1, 2, "1"]))  # fmt: skip
_doc = st.integers(0, 9).flatmap(lambda k: _versioned if k < 8 else _image if k == 8 else _value)


_POOL = [None, True, 0, -1, 1.5, "", "x", "\ud800", "cache,target=/x", [], {}, ["a"], {"k": 1},
         "type=bind,target=/m", "RUN", 2**70]  # fmt: skip


def _mutate_json(value: object, rng: random.Random) -> object:
    """A copy of `value` with one node replaced, removed or duplicated."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        out = dict(value)
        key = rng.choice(list(out))
        op = rng.randrange(3)
        if op == 0:
            del out[key]
        elif op == 1:
            out[key] = rng.choice(_POOL)
        else:
            out[key] = _mutate_json(out[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out_l = list(value)
        i = rng.randrange(len(out_l))
        op = rng.randrange(3)
        if op == 0:
            out_l.insert(i, out_l[i])
        elif op == 1:
            out_l[i] = rng.choice(_POOL)
        else:
            out_l[i] = _mutate_json(out_l[i], rng)
        return out_l
    return rng.choice(_POOL)


@FUZZ
@given(_doc, st.sampled_from([0, 0, 0, 1, 2]), st.randoms(use_true_random=False))
def test_json_documents(doc: object, mangle: int, rng: random.Random) -> None:
    for i in range(VARIANTS):
        one_json(doc if i == 0 else _mutate_json(doc, rng), mangle if i == 0 else 0)


def one_json(doc: object, mangle: int) -> None:
    from tlimage.frontends.jsonform import load_json_text

    text = json.dumps(doc)
    if mangle == 1 and len(text) > 2:
        text = text[: len(text) // 2]  # truncated
    elif mangle == 2:
        text = text.replace('"', "'", 1)
    try:
        images = load_json_text(text, "image.json")
    except JSONFormError as e:
        rejected("json", e, bool(e.path or e.file))
    except TlimageError as e:
        rejected("json", e, "image.json" in str(e))
    else:
        accepted("json", images)


# -- DSL calls ---------------------------------------------------------------------------------

_arg = st.one_of(_scalar, st.lists(_scalar, max_size=3),
                 st.dictionaries(st.text(max_size=4), _scalar, max_size=2),
                 st.sampled_from([math.nan, math.inf, -1.0, 1e300, float("-inf")]))  # fmt: skip
_METHODS = ["run", "copy", "add", "env", "workdir", "user", "entrypoint", "cmd", "label",
            "expose", "arg", "shell", "stopsignal", "volume", "healthcheck", "pip_install",
            "apt_install"]  # fmt: skip
_KW = {"run": ["options"], "copy": ["options"], "add": ["options"],
       "healthcheck": ["interval", "timeout", "start_period", "start_interval", "retries"],
       "pip_install": ["index_url", "extra_index_url", "pre", "force"],
       "apt_install": ["force"], "arg": ["default"]}  # fmt: skip
_OPTIONS = st.dictionaries(st.sampled_from(["mounts", "env", "user", "workdir", "network",
                                            "force", "chown", "chmod", "checksum", "exclude",
                                            "from", "link", "parents", "keep_git_dir"]),
                           st.one_of(_arg, st.lists(st.one_of(
                               st.sampled_from(["type=cache,target=/x", "cache,target=/x",
                                                "target=/y", "type=nope"]),
                               st.dictionaries(st.sampled_from(["type", "target", "id", "size"]),
                                               _scalar, max_size=3)), max_size=2)),
                           max_size=3)  # fmt: skip


@st.composite
def _call(draw: st.DrawFn) -> tuple[str, list, dict]:
    method = draw(st.sampled_from(_METHODS))
    args = draw(st.lists(_arg, max_size=3))
    kw: dict = {}
    for name in _KW.get(method, []):
        if draw(st.booleans()):
            kw[name] = draw(_OPTIONS if name == "options" else _arg)
    return method, args, kw


@FUZZ
@given(
    st.one_of(_scalar, st.sampled_from(["busybox", "scratch"])),
    st.lists(_call(), max_size=5),
    st.randoms(use_true_random=False),
)
def test_dsl_calls(base: object, calls: list[tuple[str, list, dict]], rng: random.Random) -> None:
    for i in range(VARIANTS):
        if i:
            calls = [(m, [rng.choice(_POOL) if rng.random() < 0.3 else a for a in args], kw)
                     for m, args, kw in calls]  # fmt: skip
            rng.shuffle(calls)
        one_dsl(base, calls)


def one_dsl(base: object, calls: list[tuple[str, list, dict]]) -> None:
    from tlimage import Image

    try:
        image = Image("fuzz", base_image=base)  # type: ignore[arg-type]
        for method, args, kw in calls:
            try:
                image = getattr(image, method)(*args, **kw)
            except TypeError as e:  # a wrong *number* of arguments is Python's to report
                if "argument" in str(e) and any(
                    w in str(e)
                    for w in ("positional", "missing", "unexpected keyword", "multiple values")
                ):
                    continue
                raise
        images = [image.to_ir()]
    except DSLError as e:
        rejected("dsl", e, e.where is not None)
    except TlimageError as e:
        rejected("dsl", e, False)
    else:
        accepted("dsl", images)
