"""ADD with Docker's semantics, against a local http.server: downloads stay files (0600, archives
too), the key covers the served content (a changed file rebuilds, an unchanged one is revalidated
with a conditional GET and stays cached), --checksum is verified; local archives keep set-id
bits."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_hostfs import image_tree
from tlimage.builder import build_image
from tlimage.errors import TlimageError
from tlimage.executor.fake import FakeExecutor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root (mknod)")


class Server:
    """Serves `files` (name -> bytes) with an ETag (the content's sha256) and answers
    If-None-Match with 304; counts full and not-modified responses."""

    def __init__(self, etag: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        self.full = 0
        self.not_modified = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                data = outer.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                tag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                if etag and self.headers.get("If-None-Match") == tag:
                    outer.not_modified += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                outer.full += 1
                self.send_response(200)
                if etag:
                    self.send_header("ETag", tag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def build(ctx: Path, text: str):  # noqa: ANN201
    (ctx / "Dockerfile").write_text(text)
    events: list[dict] = []
    result = build_image(ctx / "Dockerfile", executor=FakeExecutor(), register=False,
                         emit=events.append)  # fmt: skip
    return result, [e["event"] for e in events if e.get("index") == 1 and
                    e["event"] in ("step_cached", "step_done")]  # fmt: skip


def test_changed_content_rebuilds_and_unchanged_is_revalidated(tmp_path: Path,
                                                               server: Server) -> None:  # fmt: skip
    server.files["f.txt"] = b"one\n"
    text = f"FROM scratch\nADD {server.url}/f.txt /f.txt\n"
    first, ev = build(tmp_path, text)
    assert ev == ["step_done"]
    second, ev = build(tmp_path, text)
    assert ev == ["step_cached"] and second.image_id == first.image_id
    assert (server.full, server.not_modified) == (1, 1)  # revalidated, not downloaded again
    server.files["f.txt"] = b"two\n"
    third, ev = build(tmp_path, text)
    assert ev == ["step_done"] and third.image_id != first.image_id
    tree = image_tree(third, tmp_path / "img")
    assert (tree / "f.txt").read_bytes() == b"two\n"
    assert stat.S_IMODE(os.lstat(tree / "f.txt").st_mode) == 0o600


def test_plain_http_server_revalidates_with_last_modified(tmp_path: Path) -> None:
    import functools

    served = tmp_path / "served"
    served.mkdir()
    (served / "a.bin").write_bytes(b"A" * 100)
    os.utime(served / "a.bin", (1_600_000_000, 1_600_000_000))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(served)))  # fmt: skip
    httpd.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.bin"
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        first, _ = build(ctx, f"FROM scratch\nADD {url} /\n")
        _, ev = build(ctx, f"FROM scratch\nADD {url} /\n")
        assert ev == ["step_cached"]
        (served / "a.bin").write_bytes(b"B" * 100)
        _, ev = build(ctx, f"FROM scratch\nADD {url} /\n")
        assert ev == ["step_done"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_archives_stay_files(tmp_path: Path, server: Server) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("inside.txt")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
    server.files["a.tar"] = buf.getvalue()
    result, _ = build(tmp_path, f"FROM scratch\nADD {server.url}/a.tar /d/\n")
    tree = image_tree(result, tmp_path / "img")
    assert os.listdir(tree / "d") == ["a.tar"]
    assert (tree / "d" / "a.tar").read_bytes() == buf.getvalue()
    assert stat.S_IMODE(os.lstat(tree / "d" / "a.tar").st_mode) == 0o600


def test_checksum_is_verified_and_spares_the_request(tmp_path: Path, server: Server) -> None:
    server.files["f"] = b"payload"
    good = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    bad = "sha256:" + "0" * 64
    with pytest.raises(TlimageError, match=r"Dockerfile:2: .*checksum mismatch"):
        build(tmp_path, f"FROM scratch\nADD --checksum={bad} {server.url}/f /f\n")
    build(tmp_path, f"FROM scratch\nADD --checksum={good} {server.url}/f /f\n")
    full = server.full
    server.files.clear()  # the server no longer has it: the kept copy with that digest serves
    _, ev = build(tmp_path, f"FROM scratch\nADD --checksum={good} {server.url}/f /f\n")
    assert ev == ["step_cached"] and server.full == full
    with pytest.raises(TlimageError, match="expected sha256"):
        build(tmp_path, f"FROM scratch\nADD --checksum=md5:abc {server.url}/f /f\n")


def test_missing_url_is_a_located_error(tmp_path: Path, server: Server) -> None:
    with pytest.raises(TlimageError, match=r"Dockerfile:2: .*HTTP 404"):
        build(tmp_path, f"FROM scratch\nADD {server.url}/nope /n\n")


def test_local_archive_keeps_setid_bits(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, mode in (("bin/su", 0o4755), ("bin/wall", 0o2755)):
            ti = tarfile.TarInfo(name)
            ti.mode, ti.size = mode, 1
            tf.addfile(ti, io.BytesIO(b"x"))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    result, _ = build(tmp_path, "FROM scratch\nADD s.tar /\n")
    tree = image_tree(result, tmp_path / "img")
    assert stat.S_IMODE(os.lstat(tree / "bin" / "su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(tree / "bin" / "wall").st_mode) == 0o2755


def test_a_non_utf8_dockerfile_builds(tmp_path: Path) -> None:
    """Buildah takes a Dockerfile's bytes as they are; so does tlimage (a Latin-1 é here)."""
    (tmp_path / "Dockerfile").write_bytes(b"FROM busybox\nRUN echo caf\xe9\nLABEL x=caf\xe9\n")
    ex = FakeExecutor()
    result = build_image(tmp_path / "Dockerfile", executor=ex)
    assert [os.fsencode(a) for a in ex.runs[0].argv][-1].endswith(b"echo caf\xe9")
    assert result.record is not None
