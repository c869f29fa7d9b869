"""The sandbox HTTP API (`tl sbx serve`): JSON over HTTP/1.1 for agents in any language.

    tl sbx serve --listen 127.0.0.1:8765        # or unix:/run/tlimage/api.sock

Every request but `GET /openapi.json` and `GET /healthz` carries `Authorization: Bearer
<token>`; the token is made on first start and kept in `<state dir>/api-token` (mode 0600).
The document at `/openapi.json` (this folder's `openapi.json`) describes every endpoint.
`POST /v1/sandboxes/{id}/exec` answers JSON, or with `Accept: text/event-stream` streams the
output as Server-Sent Events (`stdout`, `stderr`, then `exit` or `error`).

The standard library's ThreadingHTTPServer: one thread per request, which is what a blocking
exec or a stream wants, and no dependency. Handlers call `tlimage.runtime` only; an error of
the project's tree becomes a JSON body `{"error", "hint"}` with a 4xx status.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tlimage._paths import state_dir
from tlimage.errors import RegistryError, RuntimeError_, TlimageError

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
TOKEN_FILE = "api-token"
MAX_BODY = 64 * 1024 * 1024


def openapi_document() -> bytes:
    return OPENAPI_PATH.read_bytes()


def api_token(path: Path | None = None) -> str:
    """The bearer token, made (0600, atomically) on first use."""
    path = path or state_dir() / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        tok = path.read_text().strip()
        if tok:
            return tok
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (tok + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a token another server made meanwhile
    except FileExistsError:
        return api_token(path)
    finally:
        os.unlink(tmp)
    return tok


class ApiError(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.hint = hint


def _status_of(e: TlimageError) -> int:
    from tlimage.runtime._errors import SandboxNotFound

    text = str(e)
    if isinstance(e, SandboxNotFound):
        return 404
    if isinstance(e, RegistryError) and ("unknown" in text or "no image" in text):
        return 404
    if isinstance(e, RuntimeError_) and (
        "No such file" in text or "no secret" in text or "no checkpoint" in text
    ):
        return 404
    if isinstance(e, RuntimeError_) and (re.search(r"\bis (Running|Suspended|Terminated|"
                                                    r"Pending|Snapshotting|Suspending|exited|"
                                                    r"failed)\b|has ended", text)
                                         or "is busy" in text):  # fmt: skip
        return 409
    return 400


# --- request checking ------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,),
}  # fmt: skip


def _body_fields(body: Any, spec: dict[str, tuple[str, bool]], where: str = "") -> dict[str, Any]:
    """Checks a JSON object against {field: (type, required)}; unknown fields are errors.
    `where` names a nested object in the messages ("network_policy.")."""
    if not isinstance(body, dict):
        raise ApiError(400, f"{where.rstrip('.') or 'the request body'} must be a JSON object")
    for k in body:
        if k not in spec:
            raise ApiError(400, f"unknown field {where + k!r}; expected one of: {', '.join(spec)}")
    out = {}
    for k, (kind, required) in spec.items():
        if k not in body or body[k] is None:
            if required:
                raise ApiError(400, f"field {where + k!r} is required")
            continue
        v = body[k]
        ok = isinstance(v, _TYPES[kind]) and not (kind in ("integer", "number")
                                                  and isinstance(v, bool))  # fmt: skip
        if not ok:
            article = "an" if kind[0] in "aeiou" else "a"
            raise ApiError(400, f"field {where + k!r} must be {article} {kind}")
        out[k] = v
    return out


def _strings(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ApiError(400, f"{what} must be an array of strings")
    if any("\0" in x for x in v):
        raise ApiError(400, f"{what} cannot contain NUL bytes")
    return v


def _policy(v: Any) -> dict[str, Any] | None:
    """A create request's `network_policy`: {mode: allow|deny|none, block: [...], allow: [...]}
    (each optional; entries are CIDRs, addresses or host names), as `Sandbox.create` takes it."""
    from tlimage.sandbox.network import MODES

    if v is None:
        return None
    b = _body_fields(v, {"mode": ("string", False), "block": ("array", False),
                         "allow": ("array", False)}, "network_policy.")  # fmt: skip
    if b.get("mode", "allow") not in MODES:
        raise ApiError(400, f"network_policy.mode must be one of: {', '.join(MODES)}")
    for k in ("block", "allow"):
        if k in b:
            b[k] = _strings(b[k], f"network_policy.{k}")
    return b


def _env(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise ApiError(400, "env must be an object of strings")
    for k, x in v.items():
        if not k or "=" in k or "\0" in k or "\0" in x:
            raise ApiError(400, f"env: invalid variable {k!r}")
    return v


def _finite(v: float | None, what: str, lo: float = 0) -> float | None:
    import math

    if v is None:
        return None
    if not math.isfinite(v) or v <= lo or v > 10**9:
        raise ApiError(400, f"{what} must be a number > {lo:g}")
    return float(v)


# --- the handler -----------------------------------------------------------------------------

Route = tuple[str, re.Pattern[str], str]
_ID = r"(?P<ref>[^/]+)"
ROUTES: list[Route] = [
    ("GET", re.compile(r"/healthz"), "health"),
    ("GET", re.compile(r"/openapi\.json"), "openapi"),
    ("GET", re.compile(r"/v1/sandboxes"), "list"),
    ("POST", re.compile(r"/v1/sandboxes"), "create"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}"), "info"),
    ("DELETE", re.compile(rf"/v1/sandboxes/{_ID}"), "terminate"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/exec"), "exec"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/files"), "files_read"),
    ("PUT", re.compile(rf"/v1/sandboxes/{_ID}/files"), "files_write"),
    ("DELETE", re.compile(rf"/v1/sandboxes/{_ID}/files"), "files_remove"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/files/list"), "files_list"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/files/stat"), "files_stat"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/files/mkdir"), "files_mkdir"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/snapshot"), "snapshot"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/clone"), "clone"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/suspend"), "suspend"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/resume"), "resume"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/processes"), "procs_list"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/processes"), "procs_spawn"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/processes/(?P<pid>[^/]+)"), "procs_get"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/processes/(?P<pid>[^/]+)/signal"), "procs_signal"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/processes/(?P<pid>[^/]+)/wait"), "procs_wait"),
    ("GET", re.compile(rf"/v1/sandboxes/{_ID}/processes/(?P<pid>[^/]+)/logs"), "procs_logs"),
    ("POST", re.compile(rf"/v1/sandboxes/{_ID}/checkpoint"), "checkpoint"),
    ("POST", re.compile(r"/v1/checkpoints/(?P<ckpt>[^/]+)/start"), "checkpoint_start"),
    ("GET", re.compile(r"/v1/secrets"), "secrets"),
]
PUBLIC = {"health", "openapi"}


class Api:
    """The operations, independent of HTTP plumbing: each takes the path parameters, the query
    and the parsed body, and returns (status, JSON value)."""

    def __init__(self, project: str | None, backend: str = "auto") -> None:
        self.project = project
        self.backend = backend

    def _sb(self, ref: str):  # noqa: ANN202 - Sandbox
        from tlimage.runtime import Sandbox

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", ref):
            raise ApiError(404, f"no sandbox {ref!r}")
        return Sandbox.get(ref, project=self.project)

    def list(self, q: dict[str, str]) -> list[dict]:
        from tlimage.runtime import list_sandboxes

        everything = _flag(q, "all")
        return [
            s.info().to_json() for s in list_sandboxes(self.project, include_terminated=everything)
        ]

    def create(self, body: Any) -> dict:
        from tlimage.runtime import BACKENDS, Sandbox

        b = _body_fields(body, {
            "image": ("string", True), "name": ("string", False), "backend": ("string", False),
            "cpus": ("number", False), "memory_mb": ("integer", False),
            "timeout_secs": ("number", False), "entrypoint": ("array", False),
            "env": ("object", False), "workdir": ("string", False), "user": ("string", False),
            "network": ("boolean", False), "secret_names": ("array", False),
            "network_policy": ("object", False),
        })  # fmt: skip
        backend = b.get("backend", self.backend)
        if backend not in BACKENDS:
            raise ApiError(400, f"backend must be one of: {', '.join(BACKENDS)}")
        cpus = _finite(b.get("cpus", 1.0), "cpus")
        if cpus is not None and cpus > 1024:
            raise ApiError(400, "cpus must be at most 1024")
        memory = b.get("memory_mb", 512)
        if not 64 <= memory <= 1 << 20:
            raise ApiError(400, "memory_mb must be between 64 and 1048576")
        sb = Sandbox.create(
            b["image"], name=b.get("name"), project=self.project, backend=backend,
            cpus=cpus or 1.0, memory=memory, timeout=_finite(b.get("timeout_secs"), "timeout_secs"),
            entrypoint=_strings(b["entrypoint"], "entrypoint") if "entrypoint" in b else None,
            env=_env(b.get("env")), workdir=b.get("workdir"), user=b.get("user"),
            network=b.get("network", True), network_policy=_policy(b.get("network_policy")),
            secret_names=_strings(b["secret_names"], "secret_names") if "secret_names" in b
            else None,
        )  # fmt: skip
        return sb.info().to_json()

    def info(self, ref: str) -> dict:
        return self._sb(ref).info().to_json()

    def terminate(self, ref: str) -> dict:
        sb = self._sb(ref)
        sb.terminate()
        return sb.info().to_json()

    def exec_args(self, body: Any) -> dict[str, Any]:
        b = _body_fields(body, {
            "cmd": ("array", True), "env": ("object", False), "workdir": ("string", False),
            "user": ("string", False), "timeout_secs": ("number", False),
            "stdin": ("string", False),
        })  # fmt: skip
        cmd = _strings(b["cmd"], "cmd")
        if not cmd:
            raise ApiError(400, "cmd must name a program")
        return {"cmd": cmd, "env": _env(b.get("env")), "workdir": b.get("workdir"),
                "user": b.get("user"), "timeout": _finite(b.get("timeout_secs"), "timeout_secs"),
                "stdin": b["stdin"].encode() if "stdin" in b else None}  # fmt: skip

    def exec(self, ref: str, args: dict[str, Any],
             on_output: Callable[[str, bytes], None] | None = None) -> dict:  # fmt: skip
        sb = self._sb(ref)
        r = sb.exec(*args["cmd"], env=args["env"], workdir=args["workdir"], user=args["user"],
                    timeout=args["timeout"], stdin=args["stdin"], on_output=on_output)  # fmt: skip
        return {
            "exit_code": r.exit_code,
            "stdout": r.stdout.decode("utf-8", "replace"),
            "stderr": r.stderr.decode("utf-8", "replace"),
            "duration_secs": r.duration,
        }

    def files_list(self, ref: str, q: dict[str, str]) -> list[dict]:
        return [e.to_json() for e in self._sb(ref).files.list(_path(q))]

    def files_stat(self, ref: str, q: dict[str, str]) -> dict:
        return self._sb(ref).files.stat(_path(q)).to_json()

    def files_read(self, ref: str, q: dict[str, str]) -> bytes:
        return self._sb(ref).files.read(_path(q))

    def files_write(self, ref: str, q: dict[str, str], data: bytes) -> dict:
        mode = q.get("mode", "644")
        if not re.fullmatch(r"[0-7]{1,4}", mode):
            raise ApiError(400, "mode must be octal permission bits, e.g. 644")
        return self._sb(ref).files.write(_path(q), data, mode=int(mode, 8)).to_json()

    def files_remove(self, ref: str, q: dict[str, str]) -> dict:
        path = _path(q)
        self._sb(ref).files.remove(path, recursive=_flag(q, "recursive"))
        return {"path": path}

    def files_mkdir(self, ref: str, body: Any) -> dict:
        b = _body_fields(body, {"path": ("string", True), "parents": ("boolean", False)})
        _check_abs(b["path"])
        return self._sb(ref).files.mkdir(b["path"], parents=b.get("parents", False)).to_json()

    def snapshot(self, ref: str, body: Any) -> dict:
        b = _body_fields(body or {}, {"register": ("string", False)})
        img = self._sb(ref).snapshot(b.get("register"))
        return {"image": img.ref, "image_id": img.image_id,
                "layers": len(img.manifest.layers), "size": img.size}  # fmt: skip

    def clone(self, ref: str, body: Any) -> dict:
        b = _body_fields(body or {}, {"name": ("string", False), "register": ("string", False),
                                      "memory": ("boolean", False),
                                      "with_secrets": ("boolean", False)})  # fmt: skip
        twin = self._sb(ref).clone(b.get("name"), register=b.get("register"),
                                   memory=b.get("memory", False),
                                   with_secrets=b.get("with_secrets", False))  # fmt: skip
        return twin.info().to_json()

    def checkpoint(self, ref: str, body: Any) -> dict:
        b = _body_fields(body or {}, {"name": ("string", False),
                                      "with_secrets": ("boolean", False)})  # fmt: skip
        return {"checkpoint": self._sb(ref).save_memory(
            b.get("name"), with_secrets=b.get("with_secrets", False))}  # fmt: skip

    def checkpoint_start(self, ckpt: str, body: Any) -> dict:
        from tlimage.runtime import Sandbox

        b = _body_fields(body or {}, {"name": ("string", False)})
        sb = Sandbox.from_checkpoint(ckpt, name=b.get("name"), project=self.project)
        return sb.info().to_json()

    def suspend(self, ref: str) -> dict:
        r = self._sb(ref).suspend()
        return {"seconds": r.seconds, "memory_snapshot": r.memory_snapshot, "note": r.note}

    def resume(self, ref: str) -> dict:
        return {"seconds": self._sb(ref).resume()}

    def _proc(self, ref: str, pid: str):  # noqa: ANN202 - Process
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", pid):
            raise ApiError(404, f"no process {pid!r}")
        try:
            return self._sb(ref).process(pid)
        except RuntimeError_ as e:
            if "has no process" in str(e):
                raise ApiError(404, str(e)) from None
            raise

    def procs_list(self, ref: str) -> list[dict]:
        return [p.status().to_json() for p in self._sb(ref).processes()]

    def procs_spawn(self, ref: str, body: Any) -> dict:
        b = _body_fields(body, {
            "cmd": ("array", True), "name": ("string", False), "env": ("object", False),
            "workdir": ("string", False), "user": ("string", False),
        })  # fmt: skip
        cmd = _strings(b["cmd"], "cmd")
        if not cmd:
            raise ApiError(400, "cmd must name a program")
        p = self._sb(ref).spawn(*cmd, name=b.get("name"), env=_env(b.get("env")),
                                workdir=b.get("workdir"), user=b.get("user"))  # fmt: skip
        return p.status().to_json()

    def procs_get(self, ref: str, pid: str) -> dict:
        return self._proc(ref, pid).status().to_json()

    def procs_signal(self, ref: str, pid: str, body: Any) -> dict:
        b = _body_fields(body or {}, {"signal": ("string", False)})
        p = self._proc(ref, pid)
        p.signal(b.get("signal", "TERM"))
        return p.status().to_json()

    def procs_wait(self, ref: str, pid: str, q: dict[str, str]) -> dict:
        try:
            timeout = float(q.get("timeout_secs", "30"))
        except ValueError:
            raise ApiError(400, "timeout_secs must be a number") from None
        if not 0 <= timeout <= 600:
            raise ApiError(400, "timeout_secs must be between 0 and 600")
        p = self._proc(ref, pid)
        p.wait(timeout)
        return p.status().to_json()

    def secrets(self) -> dict:
        from tlimage.runtime import list_secrets

        return {"names": list_secrets(project=self.project)}


def _flag(q: dict[str, str], name: str) -> bool:
    v = q.get(name, "false").lower()
    if v not in ("true", "false", "1", "0"):
        raise ApiError(400, f"query parameter {name} must be true or false")
    return v in ("true", "1")


def _check_abs(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise ApiError(400, f"path must be an absolute sandbox path, got {path!r}")
    return path


def _path(q: dict[str, str]) -> str:
    if "path" not in q:
        raise ApiError(400, "query parameter path is required")
    return _check_abs(q["path"])


class Handler(BaseHTTPRequestHandler):
    server_version = "tlimage"
    protocol_version = "HTTP/1.1"
    api: Api
    token: str
    quiet: bool = False

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        if not self.quiet:
            sys.stderr.write(f"tl sbx serve: {format % args}\n")

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              extra: dict[str, str] | None = None) -> None:  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # a body left unread cannot poison the next
        self.close_connection = True
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode())

    def _error(self, status: int, message: str, hint: str | None = None) -> None:
        body: dict[str, Any] = {"error": message}
        if hint:
            body["hint"] = hint
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        self._send(status, json.dumps(body).encode(), extra=extra)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise ApiError(413, f"the body must be at most {MAX_BODY >> 20} MiB")
        return self.rfile.read(n) if n else b""

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    # -- dispatch ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the base's naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def __getattr__(self, name: str) -> Any:
        """Any other method (HEAD, PATCH, QUERY, ...) gets 405 with an Allow header, or 404,
        from the router; the base class would answer 501."""
        if name.startswith("do_") and name[3:].isalpha():
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        try:
            self._route()
        except ApiError as e:
            self._safe_error(e.status, str(e), e.hint)
        except TlimageError as e:
            self._safe_error(_status_of(e), str(e), e.hint)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            import traceback

            traceback.print_exc()
            self._safe_error(500, f"internal error: {type(e).__name__}: {e}")

    def _safe_error(self, status: int, message: str, hint: str | None = None) -> None:
        if getattr(self, "_streaming", False):
            self._event("error", {"error": message, "status": status})
            self._end_stream()
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._error(status, message, hint)

    def _route(self) -> None:
        url = urlsplit(self.path)
        try:
            q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True,
                                               strict_parsing=False).items()}  # fmt: skip
        except ValueError:
            raise ApiError(400, "invalid query string") from None
        from urllib.parse import unquote

        path = unquote(url.path)
        allowed = []
        for method, pattern, name in ROUTES:
            m = pattern.fullmatch(path)
            if not m:
                continue
            if method != self.command:
                allowed.append(method)
                continue
            if name not in PUBLIC and not self._authorized():
                raise ApiError(401, "missing or wrong bearer token",
                               hint="send Authorization: Bearer <token from the api-token "
                                    "file in the state folder>")  # fmt: skip
            return self._call(name, m.groupdict(), q)
        if allowed:
            self._read_body()
            self._send(405, json.dumps({"error": f"{self.command} is not allowed here"}).encode(),
                       extra={"Allow": ", ".join(sorted(set(allowed)))})  # fmt: skip
            return
        raise ApiError(404, f"no endpoint {self.command} {url.path}")

    def _call(self, name: str, params: dict[str, str], q: dict[str, str]) -> None:
        api = self.api
        ref = params.get("ref")
        if name == "health":
            return self._json(200, {"ok": True})
        if name == "openapi":
            return self._send(200, openapi_document())
        if name == "list":
            return self._json(200, api.list(q))
        if name == "create":
            return self._json(201, api.create(self._json_body()))
        if name == "info":
            return self._json(200, api.info(ref))
        if name == "terminate":
            return self._json(200, api.terminate(ref))
        if name == "exec":
            args = api.exec_args(self._json_body())
            if "text/event-stream" in self.headers.get("Accept", ""):
                return self._exec_stream(ref, args)
            return self._json(200, api.exec(ref, args))
        if name == "files_read":
            return self._send(200, api.files_read(ref, q), "application/octet-stream")
        if name == "files_write":
            return self._json(200, api.files_write(ref, q, self._read_body()))
        if name == "files_remove":
            return self._json(200, api.files_remove(ref, q))
        if name in ("files_list", "files_stat"):
            return self._json(200, getattr(api, name)(ref, q))
        if name == "files_mkdir":
            return self._json(201, api.files_mkdir(ref, self._json_body()))
        if name in ("snapshot", "clone"):
            status = 201
            return self._json(status, getattr(api, name)(ref, self._json_body()))
        if name in ("suspend", "resume"):
            self._read_body()
            return self._json(200, getattr(api, name)(ref))
        if name == "procs_list":
            return self._json(200, api.procs_list(ref))
        if name == "procs_spawn":
            return self._json(201, api.procs_spawn(ref, self._json_body()))
        if name == "procs_get":
            return self._json(200, api.procs_get(ref, params["pid"]))
        if name == "procs_signal":
            return self._json(200, api.procs_signal(ref, params["pid"], self._json_body()))
        if name == "procs_wait":
            self._read_body()
            return self._json(200, api.procs_wait(ref, params["pid"], q))
        if name == "procs_logs":
            return self._logs(ref, params["pid"], q)
        if name == "checkpoint":
            return self._json(201, api.checkpoint(ref, self._json_body()))
        if name == "checkpoint_start":
            return self._json(201, api.checkpoint_start(params["ckpt"], self._json_body()))
        if name == "secrets":
            return self._json(200, api.secrets())
        raise ApiError(404, f"no endpoint {name}")

    # -- Server-Sent Events -----------------------------------------------------------------

    def _event(self, kind: str, data: dict) -> None:
        payload = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        with self._lock:
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

    def _end_stream(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        self._streaming = False

    def _logs(self, ref: str, pid: str, q: dict[str, str]) -> None:
        """A process's kept output: the bytes of one stream, or with `Accept:
        text/event-stream` both streams as events until the process ends (`follow`)."""
        p = self.api._proc(ref, pid)
        stream = q.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise ApiError(400, "stream must be stdout or stderr")
        if "text/event-stream" not in self.headers.get("Accept", ""):
            return self._send(200, p.output(stream), "application/octet-stream")
        self._start_stream()
        streams = [stream] if "stream" in q else ["stdout", "stderr"]

        def pump(s: str) -> None:
            with contextlib.suppress(OSError):
                for chunk in p.follow(s):
                    self._chunk_event(s, chunk)

        threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = p.status()
        self._event("exit", {"exit_code": st.exit_code, "state": st.state})
        self._end_stream()

    def _start_stream(self) -> None:
        self._lock = threading.Lock()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self._streaming = True

    def _chunk_event(self, stream: str, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        ev = {"data": text}
        if text.encode() != data:
            ev["base64"] = base64.b64encode(data).decode()
        self._event(stream, ev)

    def _exec_stream(self, ref: str, args: dict[str, Any]) -> None:
        self.api._sb(ref)  # a missing sandbox is a plain 404, before the stream starts
        self._start_stream()
        r = self.api.exec(ref, args, on_output=self._chunk_event)
        self._event("exit", {"exit_code": r["exit_code"], "duration_secs": r["duration_secs"]})
        self._end_stream()


class _UnixServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self):  # noqa: ANN201
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def make_server(listen: str, *, project: str | None = None, backend: str = "auto",
                token: str | None = None, quiet: bool = False) -> ThreadingHTTPServer:  # fmt: skip
    """A server bound to `listen` (`unix:PATH`, `HOST:PORT`, `:PORT`; port 0 picks one);
    call `serve_forever()` on it. Only loopback addresses and unix sockets are accepted."""
    from tlimage._paths import project_name

    handler = type("BoundHandler", (Handler,), {
        "api": Api(project_name(project), backend), "token": token or api_token(),
        "quiet": quiet})  # fmt: skip
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        if not path.is_absolute():
            raise RuntimeError_(f"--listen {listen}: the socket path must be absolute")
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        srv: ThreadingHTTPServer = _UnixServer(str(path), handler)
        os.chmod(path, 0o600)
        return srv
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise RuntimeError_(f"--listen {listen!r}: expected unix:PATH or HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError_(f"--listen {listen}: only loopback addresses are served (the API "
                            "runs commands as root); use a unix socket or 127.0.0.1")  # fmt: skip
    cls = ThreadingHTTPServer
    if ":" in host:
        cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    srv = cls((host, int(port)), handler)
    srv.daemon_threads = True
    return srv


def address_of(srv: ThreadingHTTPServer) -> str:
    if srv.address_family == socket.AF_UNIX:
        return f"unix:{srv.server_address}"
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}" if ":" not in str(host) else f"http://[{host}]:{port}"
