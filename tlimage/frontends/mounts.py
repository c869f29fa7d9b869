"""RUN mounts as every front end reads them: one parser, one lowering to the IR's typed mounts.

A Dockerfile's `RUN --mount=type=cache,target=/root/.cache,sharing=locked` is one record of Go's
`encoding/csv` (BuildKit reads it with `csv.NewReader`; grammar: `grammar/dockerfile_mount.lark`)
of `key=value` fields (or a bare `ro`, `rw`, `required`). The DSL and JSON documents take the same
string, or an object of the same keys (`{"type": "cache", "target": "/root/.cache"}`), so equal
mounts give equal IR, and equal digests, whichever front end wrote them.

- `parse_mount(spec, expander)`: a string spec to a `MountSpec` (keys, values and per-type rules
  checked as BuildKit's `instructions/commands_runmount.go` does).
- `parse_mount_object(obj)`: the same from an object.
- `lower_mount(spec, workdir, resolve_from)`: a `MountSpec` to an `ir.Mount` with BuildKit's
  defaults filled in (as `dockerfile2llb/convert_runmount.go`): a relative target resolves
  against the working directory; a cache's id is its target; a secret's id comes from `source`,
  `id` or the target's name and its file defaults to `/run/secrets/<id>`; ssh's to
  `/run/buildkit/ssh_agent.0`.
- `mount_from_user(value)`: both steps for the DSL and JSON (targets must be absolute there).

Errors are `Problem`s; each front end places them (file:line:col, call site, JSON path).
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tlimage import ir
from tlimage.frontends.problem import Problem

# The Go value syntaxes live with the Dockerfile front end, whose package imports this module:
# they are imported where used, so that either module can be imported first.

Expander = Callable[[str], str]

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
SHARING_MODES = ("shared", "private", "locked")
MOUNT_KEYS = (
    "type", "from", "source", "target", "readonly", "id", "sharing", "required", "mode", "uid",
    "gid", "size", "env", "src", "dst", "destination", "ro", "rw", "readwrite",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MountSpec:
    """A parsed mount spec, as written (target not yet resolved, defaults not filled in).
    `readonly` already has its per-type default (bind, secret and ssh mounts are read-only
    unless `rw`; cache and tmpfs are writable). `id` is the cache id or the secret/ssh id;
    `sharing` is "" for the default (shared)."""

    type: str = "bind"
    target: str = ""
    source: str = ""
    from_: str = ""
    readonly: bool = True
    id: str = ""
    sharing: str = ""
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    env: str = ""


def suggest(value: str, options: Iterable[str]) -> str:
    from tlimage.frontends.dockerfile._gostr import go_lower

    match = difflib.get_close_matches(go_lower(value), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# -- parsing --------------------------------------------------------------------------------


def parse_mount(spec: str, expander: Expander | None = None) -> MountSpec:
    """One `--mount=` value. Without an expander, values holding `$` are kept as written and
    checked only once expanded (BuildKit does all of it at that point; checking what can be
    checked early reports mistakes before anything runs)."""
    from tlimage.frontends.dockerfile import _values

    try:
        fields = _values.read_csv_record(spec)
    except _values.CSVError as e:
        raise Problem(f"failed to parse csv mounts: {e}", (spec, "--mount")) from None
    return _parse_fields(fields, spec, expander)


def parse_mount_object(obj: Mapping[str, Any]) -> MountSpec:
    """A mount given as an object of the spec's keys. Values may be strings, numbers (a number
    `mode` is the mode itself, as `0o755` in Python) or booleans."""
    from tlimage.frontends.dockerfile._gostr import go_lower

    fields = []
    for key, value in obj.items():
        if not isinstance(key, str):
            raise Problem(f"mount keys are strings, got {key!r}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = format(value, "o") if go_lower(key) == "mode" else str(value)
        elif isinstance(value, str):
            text = value
        else:
            raise Problem(f"mount {key}: expected a string, number or boolean, got {value!r}")
        fields.append(f"{key}={text}")
    return _parse_fields(fields, ",".join(fields), lambda v: v)  # no variables here


def _parse_fields(fields: list[str], spec: str, expander: Expander | None) -> MountSpec:
    from tlimage.frontends.dockerfile._gostr import go_lower, go_quote

    m: dict[str, object] = {"type": "bind"}
    ro_auto = True
    deferred = False
    for fld in fields:
        key, eq, value = fld.partition("=")
        key = go_lower(key)
        if not eq:
            if key in ("readonly", "ro"):
                m["readonly"], ro_auto = True, False
                continue
            if key in ("readwrite", "rw"):
                m["readonly"], ro_auto = False, False
                continue
            if key == "required":
                if m["type"] in ("secret", "ssh"):
                    m["required"] = True
                    continue
                raise Problem(
                    f"unexpected key '{key}' for mount type '{m['type']}'", (fld, spec, "--mount")
                )
            raise Problem(f"invalid field '{fld}' must be a key=value pair", (fld, spec, "--mount"))
        if expander is not None:
            value = expander(value)
        elif key == "from" and re.search(r"\$.", value):
            raise Problem(
                f"'{key}' doesn't support variable expansion, define alias stage instead",
                (fld, spec, "--mount"),
            )
        elif "$" in value:
            if key not in MOUNT_KEYS:
                raise Problem(
                    f"unexpected key '{key}' in '{fld}'{suggest(key, MOUNT_KEYS)}",
                    (fld, spec, "--mount"),
                )
            deferred = True
            continue  # checked once expanded
        ro_auto = _mount_field(m, key, value, fld) and ro_auto
    if deferred:
        # Cross-field rules need every value; they run when the spec is expanded.
        return MountSpec(**m)  # type: ignore[arg-type]
    mtype = m["type"]
    file_info_ok = mtype in ("secret", "ssh", "cache")
    for k in ("mode", "uid", "gid"):
        if m.get(k) is not None and not file_info_ok:
            raise Problem(
                f"{k} not allowed for {go_quote(str(mtype))} type mounts", (spec, "--mount")
            )
    if m.get("size") is not None and mtype != "tmpfs":
        raise Problem(f"size not allowed for {go_quote(str(mtype))} type mounts", (spec, "--mount"))
    if m.get("env") and mtype != "secret":
        raise Problem(f"env not allowed for {go_quote(str(mtype))} type mounts", (spec, "--mount"))
    if ro_auto:
        m["readonly"] = mtype not in ("cache", "tmpfs")
    if m.get("sharing") and mtype != "cache":
        raise Problem(f"invalid cache sharing set for {mtype} mount", (spec, "--mount"))
    if mtype == "secret":
        if m.get("from_"):
            raise Problem("secret mount should not have a from", (spec, "--mount"))
        if not (m.get("source") or m.get("target") or m.get("id") or m.get("env")):
            raise Problem("invalid secret mount. one of source, target required", (spec, "--mount"))
        if m.get("source") and m.get("id"):
            raise Problem("both source and id can't be set", (spec, "--mount"))
    return MountSpec(**m)  # type: ignore[arg-type]


def _mount_field(m: dict[str, object], key: str, value: str, fld: str) -> bool:
    """Apply one key=value; returns False when it set read-only/read-write explicitly."""
    from tlimage.frontends.dockerfile import _values
    from tlimage.frontends.dockerfile._gostr import go_lower, go_quote

    def bad(what: str = "") -> Problem:
        return Problem(what or f"invalid value for {key}: {value}", (fld, "--mount"))

    if key == "type":
        t = go_lower(value)
        if t not in MOUNT_TYPES:
            raise Problem(
                f"unsupported mount type {go_quote(value)}{suggest(value, MOUNT_TYPES)}", fld
            )
        m["type"] = t
    elif key == "from":
        m["from_"] = value
    elif key in ("source", "src"):
        m["source"] = value
    elif key in ("target", "dst", "destination"):
        m["target"] = value
    elif key in ("readonly", "ro", "readwrite", "rw"):
        try:
            flag = _values.parse_bool(value)
        except ValueError:
            raise bad() from None
        m["readonly"] = flag if key in ("readonly", "ro") else not flag
        return False
    elif key == "required":
        if m["type"] not in ("secret", "ssh"):
            raise bad(f"unexpected key '{key}' for mount type '{m['type']}'")
        try:
            m["required"] = _values.parse_bool(value)
        except ValueError:
            raise bad() from None
    elif key == "id":
        m["id"] = value
    elif key == "sharing":
        s = go_lower(value)
        if s not in SHARING_MODES:
            raise bad(f"unsupported sharing value {go_quote(value)}")
        m["sharing"] = s
    elif key in ("mode", "uid", "gid"):
        try:
            m[key] = _values.parse_uint(value, 8 if key == "mode" else 10, 32)
        except ValueError:
            raise bad(f"invalid value {value} for {key}") from None
    elif key == "size":
        try:
            m["size"] = _values.ram_in_bytes(value)
        except ValueError:
            raise bad(f"invalid value {value} for size") from None
    elif key == "env":
        m["env"] = value
    else:
        raise Problem(
            f"unexpected key '{key}' in '{fld}'{suggest(key, MOUNT_KEYS)}", (fld, "--mount")
        )
    return True


# -- lowering -------------------------------------------------------------------------------


def _abs(path: str) -> str:
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def lower_mount(m: MountSpec, workdir: str, resolve_from: Callable[[str], str]) -> ir.Mount:
    """A parsed (and expanded) mount as the IR's typed mount, BuildKit's defaults filled in.
    `resolve_from` maps `from=` to a stage's IR name (or leaves an image name)."""
    if m.type == "secret":
        sid = m.source or m.id
        if not sid:
            if not m.target:
                raise Problem("a secret mount needs one of id, source or target", "--mount")
            sid = posixpath.basename(m.target.rstrip("/"))
        target = _abs(m.target) if m.target else ""
        if not target and not m.env:
            target = "/run/secrets/" + posixpath.basename(sid)
        return ir.SecretMount(id=sid, target=target, env=m.env, required=m.required,
                              mode=m.mode, uid=m.uid, gid=m.gid)  # fmt: skip
    if m.type == "ssh":
        return ir.SshMount(id=m.id or "default",
                           target=_abs(m.target) if m.target else "/run/buildkit/ssh_agent.0",
                           required=m.required, mode=m.mode, uid=m.uid, gid=m.gid)  # fmt: skip
    target = m.target
    if not target.startswith("/"):
        target = posixpath.join("/", workdir, target)
    target = _abs(target)
    if target == "/":
        raise Problem(f'invalid mount target "{target}"', "--mount")
    from_ = resolve_from(m.from_) if m.from_ else None
    if m.type == "tmpfs":
        return ir.TmpfsMount(target=target, size=m.size)
    if m.type == "bind":
        return ir.BindMount(target=target, source=m.source, from_=from_, readonly=m.readonly)
    return ir.CacheMount(target=target, id=m.id or target, sharing=m.sharing or "shared",  # type: ignore[arg-type]
                         from_=from_, source=m.source, readonly=m.readonly, mode=m.mode,
                         uid=m.uid, gid=m.gid)  # fmt: skip


def mount_from_user(value: object) -> ir.Mount:
    """A DSL or JSON mount (a spec string or an object) as an IR mount. Targets other than a
    secret's or ssh socket's must be absolute (there is no working directory to resolve
    against). Raises `Problem` with the message the front ends show."""
    if isinstance(value, Mapping):
        shown = repr(dict(value))
        parse: Callable[[], MountSpec] = lambda: parse_mount_object(value)  # noqa: E731
    elif isinstance(value, str):
        shown = repr(value)
        parse = lambda: parse_mount(value, lambda v: v)  # noqa: E731  (no variables here)
    else:
        raise Problem(f"a mount must be a 'type=...,target=...' string or a dict, got {value!r}")
    try:
        spec = parse()
        if spec.type not in ("secret", "ssh") and not spec.target.startswith("/"):
            raise Problem("the target must be an absolute path (target=/path)")
        return lower_mount(spec, "/", lambda name: name)
    except Problem as e:
        raise Problem(f"invalid mount {shown}: {e.message}", e.needle, e.hint) from None
