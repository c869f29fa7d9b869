"""The HTTP API against a real `tl sbx serve` and namespace sandboxes: every operation once,
exec output as Server-Sent Events, a unix socket, and schemathesis run against the served
OpenAPI document (bounded examples; a running sandbox's id supplied) with no server error."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
    pytest.mark.skipif(shutil.which("nsenter") is None or shutil.which("unshare") is None,
                       reason="util-linux (nsenter, unshare) is not installed"),
]  # fmt: skip


def _serve(listen: str) -> tuple[subprocess.Popen, str]:
    code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "sbx", "serve", "-q", "--listen", listen,
                             "--backend", "namespace"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving the sandbox API on "), proc.stderr.read() if proc.stderr else ""
    return proc, line.split(" on ", 1)[1].strip()


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


@pytest.fixture
def image(tmp_path: Path) -> str:
    from tlimage.builder import build_image

    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("api", base_image="busybox")'
        '.run("mkdir -p /srv").env("APP_ENV", "prod")\n')  # fmt: skip
    build_image(tmp_path / "image.py", isolation="namespace")
    return "api:latest"


@pytest.fixture
def server(image: str) -> Iterator[tuple[str, int, str]]:
    from tlimage.runtime.http import api_token

    proc, url = _serve("127.0.0.1:0")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        yield host, int(port), api_token()
    finally:
        err = _stop(proc)
        assert "Traceback" not in err, err


def _call(server, method: str, path: str, body=None, headers=None):  # noqa: ANN001, ANN202
    host, port, tok = server
    c = http.client.HTTPConnection(host, port, timeout=120)
    h = {"Authorization": f"Bearer {tok}", **(headers or {})}
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    c.request(method, path, body=raw, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    ctype = r.getheader("Content-Type", "")
    return r.status, (json.loads(data) if ctype == "application/json" else data)


def _sse(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_every_operation(server, image: str) -> None:  # noqa: ANN001
    from tlimage.runtime import set_secret

    set_secret("TOKEN", "t0k3n")
    st, sb = _call(server, "POST", "/v1/sandboxes",
                   {"image": image, "name": "apibox", "env": {"X": "1"}, "timeout_secs": 300,
                    "secret_names": ["TOKEN"]})  # fmt: skip
    assert st == 201, sb
    sid = sb["sandbox_id"]
    assert (
        sb["status"] == "Running" and sb["secret_names"] == ["TOKEN"] and sb["timeout_secs"] == 300
    )
    assert _call(server, "GET", "/v1/secrets") == (200, {"names": ["TOKEN"]})
    assert [s["sandbox_id"] for s in _call(server, "GET", "/v1/sandboxes")[1]] == [sid]
    assert _call(server, "GET", "/v1/sandboxes/apibox")[1]["sandbox_id"] == sid

    st, r = _call(server, "POST", f"/v1/sandboxes/{sid}/exec",
                  {"cmd": ["sh", "-c", "echo $APP_ENV $X $TOKEN; cat; echo err >&2; exit 4"],
                   "stdin": "in\n", "workdir": "/srv"})  # fmt: skip
    assert st == 200 and (r["exit_code"], r["stdout"], r["stderr"]) == (
        4,
        "prod 1 t0k3n\nin\n",
        "err\n",
    )
    st, raw = _call(server, "POST", f"/v1/sandboxes/{sid}/exec",
                    {"cmd": ["sh", "-c", "echo one; sleep 0.3; echo two >&2; printf '\\377'"]},
                    headers={"Accept": "text/event-stream"})  # fmt: skip
    events = _sse(raw)
    assert events[0] == ("stdout", {"data": "one\n"})
    assert ("stderr", {"data": "two\n"}) in events
    assert any(e == "stdout" and d.get("base64") == "/w==" for e, d in events)
    assert events[-1][0] == "exit" and events[-1][1]["exit_code"] == 0
    st, raw = _call(server, "POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["nope"]},
                    headers={"Accept": "text/event-stream"})  # fmt: skip
    assert _sse(raw)[-1][0] == "error" and "not found" in _sse(raw)[-1][1]["error"]

    st, info = _call(server, "PUT", f"/v1/sandboxes/{sid}/files?path=/srv/a.txt&mode=600", b"data")
    assert st == 200 and (info["mode"], info["size"]) == ("0600", 4)
    assert _call(server, "GET", f"/v1/sandboxes/{sid}/files?path=/srv/a.txt") == (200, b"data")
    assert _call(server, "POST", f"/v1/sandboxes/{sid}/files/mkdir",
                 {"path": "/srv/d/e", "parents": True})[0] == 201  # fmt: skip
    names = [
        e["name"] for e in _call(server, "GET", f"/v1/sandboxes/{sid}/files/list?path=/srv")[1]
    ]
    assert names == ["a.txt", "d"]
    assert _call(server, "GET", f"/v1/sandboxes/{sid}/files/stat?path=/srv/d")[1]["type"] == "dir"
    assert (
        _call(server, "DELETE", f"/v1/sandboxes/{sid}/files?path=/srv/d&recursive=true")[0] == 200
    )
    st, err = _call(server, "GET", f"/v1/sandboxes/{sid}/files/stat?path=/srv/d")
    assert st == 404 and "No such file" in err["error"]

    st, p = _call(server, "POST", f"/v1/sandboxes/{sid}/processes",
                  {"cmd": ["sh", "-c", "echo up; echo e >&2; sleep 30"], "name": "bg"})  # fmt: skip
    assert st == 201 and p["state"] == "running" and p["name"] == "bg", p
    base = f"/v1/sandboxes/{sid}/processes"
    assert [x["id"] for x in _call(server, "GET", base)[1]] == [p["id"]]
    assert _call(server, "GET", f"{base}/bg")[1]["pid"] == p["pid"]
    assert _call(server, "POST", f"{base}/{p['id']}/wait?timeout_secs=0.2")[1]["state"] == "running"
    assert _call(server, "GET", f"{base}/{p['id']}/logs?stream=stderr") == (200, b"e\n")
    st, sent = _call(server, "POST", f"{base}/{p['id']}/signal", {"signal": "KILL"})
    assert st == 200
    st, raw = _call(server, "GET", f"{base}/{p['id']}/logs",
                    headers={"Accept": "text/event-stream"})  # fmt: skip
    events = _sse(raw)
    assert ("stdout", {"data": "up\n"}) in events and ("stderr", {"data": "e\n"}) in events
    assert events[-1] == ("exit", {"exit_code": 137, "state": "exited"})
    assert _call(server, "GET", f"{base}/99")[0] == 404
    st, err = _call(server, "POST", f"{base}/{p['id']}/signal", {"signal": "TERM"})
    assert st == 409 and "is exited" in err["error"]

    st, snap = _call(server, "POST", f"/v1/sandboxes/{sid}/snapshot", {"register": "apisnap:v1"})
    assert st == 201 and snap["image"] == "apisnap:v1"
    st, twin = _call(server, "POST", f"/v1/sandboxes/{sid}/clone", {})
    assert st == 201 and twin["sandbox_id"] != sid
    st, r = _call(server, "POST", f"/v1/sandboxes/{twin['sandbox_id']}/exec",
                  {"cmd": ["cat", "/srv/a.txt"]})  # fmt: skip
    assert r["stdout"] == "data"
    assert _call(server, "POST", f"/v1/sandboxes/{sid}/suspend")[1]["memory_snapshot"] is False
    st, err = _call(server, "POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["true"]})
    assert st == 409 and "Suspended" in err["error"]
    assert _call(server, "POST", f"/v1/sandboxes/{sid}/resume")[0] == 200
    for ref in (sid, twin["sandbox_id"]):
        st, end = _call(server, "DELETE", f"/v1/sandboxes/{ref}")
        assert st == 200 and end["status"] == "Terminated" and end["terminated_at"].endswith("Z")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_unix_socket(image: str, tmp_path: Path) -> None:
    from tlimage.runtime.http import api_token

    sock = tmp_path / "api.sock"
    proc, url = _serve(f"unix:{sock}")
    try:
        assert url == f"unix:{sock}"
        out = subprocess.run(["curl", "-sS", "--unix-socket", str(sock), "-H",
                              f"Authorization: Bearer {api_token()}", "http://x/v1/sandboxes"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0 and json.loads(out.stdout) == [], out.stderr
    finally:
        _stop(proc)


@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error(server, image: str, tmp_path: Path) -> None:  # noqa: ANN001
    from tlimage.runtime import Sandbox

    host, port, tok = server
    sb = Sandbox.create(image, backend="namespace", timeout=600)
    (tmp_path / "schemathesis.toml").write_text(
        f'[parameters]\n"path.id" = "{sb.id}"\n[generation]\nallow-x00 = false\n'
    )
    t0 = time.monotonic()
    run = subprocess.run(
        ["schemathesis", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         f"http://{host}:{port}/openapi.json", "--url", f"http://{host}:{port}",
         "-H", f"Authorization: Bearer {tok}", "--max-examples", "5", "--checks",
         "not_a_server_error", "--generation-deterministic", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    print(f"schemathesis took {time.monotonic() - t0:.1f} s")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Server error" not in run.stdout
    assert "generated" in run.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_typescript_client_against_a_live_server(server, image: str) -> None:  # noqa: ANN001
    from tlimage.frontends.typescript import sdk_dir

    host, port, tok = server
    env = {**os.environ, "TLIMAGE_API_URL": f"http://{host}:{port}", "TLIMAGE_API_TOKEN": tok,
           "TLIMAGE_TEST_IMAGE": image}  # fmt: skip
    proc = subprocess.run(["node", "--test", "test/sandbox.test.js"], cwd=sdk_dir(), env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# pass 2" in proc.stdout and "# skipped 0" in proc.stdout, proc.stdout[-2000:]
