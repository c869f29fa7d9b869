"""The HTTP API's plumbing, without a sandbox: the served OpenAPI document is the committed one
and lists exactly the routes served, the token is made once (0600) and required, and bad
requests get 4xx JSON errors."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlimage.errors import RuntimeError_
from tlimage.runtime.http import OPENAPI_PATH, ROUTES, api_token, make_server


@pytest.fixture
def server() -> Iterator[tuple[str, int, str]]:
    srv = make_server("127.0.0.1:0", quiet=True, backend="namespace")  # no KVM probe
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        host, port = srv.server_address[:2]
        yield host, port, api_token()
    finally:
        srv.shutdown()
        srv.server_close()


def _req(server, method: str, path: str, body: bytes | None = None,  # noqa: ANN001
         token: str | None = "ok", headers: dict | None = None) -> tuple[int, dict, bytes]:  # fmt: skip
    host, port, tok = server
    c = http.client.HTTPConnection(host, port, timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {tok if token == 'ok' else token}"
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def test_served_document_is_the_committed_one(server) -> None:  # noqa: ANN001
    status, headers, body = _req(server, "GET", "/openapi.json", token=None)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body == OPENAPI_PATH.read_bytes()
    doc = json.loads(body)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    names = {"ref": "{id}", "pid": "{pid}", "ckpt": "{name}"}
    served = {(m, re.sub(r"\(\?P<(ref|pid|ckpt)>\[\^/\]\+\)", lambda g: names[g[1]],
                         pat.pattern)
               .replace("\\.", "."))
              for m, pat, name in ROUTES if name != "openapi"}  # fmt: skip
    assert documented == served
    info = doc["components"]["schemas"]["SandboxInfo"]["required"]
    assert info == ["sandbox_id", "namespace", "status", "image", "resources", "secret_names",
                    "timeout_secs", "entrypoint", "created_at", "terminated_at"]  # fmt: skip


def test_token_is_made_once_and_kept_private() -> None:
    tok = api_token()
    path = Path(os.environ["TLIMAGE_STATE_DIR"]) / "api-token"
    assert path.stat().st_mode & 0o777 == 0o600 and len(tok) >= 32
    assert api_token() == tok


def test_auth_and_errors(server) -> None:  # noqa: ANN001
    assert _req(server, "GET", "/healthz", token=None)[0] == 200
    status, headers, body = _req(server, "GET", "/v1/sandboxes", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert "bearer token" in json.loads(body)["error"]
    assert _req(server, "GET", "/v1/sandboxes", token="wrong")[0] == 401
    status, _, body = _req(server, "GET", "/v1/sandboxes")
    assert (status, body) == (200, b"[]")
    status, _, body = _req(server, "GET", "/v1/sandboxes/sb-nothere")
    assert status == 404 and "no sandbox 'sb-nothere'" in json.loads(body)["error"]
    status, headers, _ = _req(server, "PATCH", "/v1/sandboxes")
    assert status == 405 and headers["Allow"] == "GET, POST"
    assert _req(server, "QUERY", "/nowhere")[0] == 404
    status, _, body = _req(server, "POST", "/v1/sandboxes", body=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = _req(server, "POST", "/v1/sandboxes", body=b'{"image": 3}')
    assert status == 400 and "'image' must be a string" in json.loads(body)["error"]
    status, _, body = _req(server, "POST", "/v1/sandboxes", body=b'{"image": "x", "bogus": 1}')
    assert status == 400 and "unknown field 'bogus'" in json.loads(body)["error"]
    for policy, says in [
        (b'{"mode": "open"}', "network_policy.mode must be one of: allow"),
        (b'{"allow": [1]}', "network_policy.allow must be an array of strings"),
        (b"[]", "field 'network_policy' must be an object"),
        (b'{"mode": 1}', "field 'network_policy.mode' must be a string"),
    ]:
        status, _, body = _req(
            server,
            "POST",
            "/v1/sandboxes",
            body=b'{"image": "x", "network_policy": ' + policy + b"}",
        )
        assert status == 400 and says in json.loads(body)["error"], body
    status, _, body = _req(server, "POST", "/v1/sandboxes", body=b'{"image": "nope:1"}')
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = _req(server, "POST", "/v1/sandboxes/sb-x/exec", body=b'{"cmd": []}')
    assert status == 400 and "cmd must name a program" in json.loads(body)["error"]
    assert _req(server, "GET", "/v1/secrets")[2] == b'{"names": []}'


def test_listen_addresses(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError_, match="only loopback"):
        make_server("0.0.0.0:0", quiet=True)
    with pytest.raises(RuntimeError_, match="expected unix:PATH or HOST:PORT"):
        make_server("nowhere", quiet=True)
    sock = tmp_path / "api.sock"
    srv = make_server(f"unix:{sock}", quiet=True)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"ok": true}')
    finally:
        srv.shutdown()
        srv.server_close()
