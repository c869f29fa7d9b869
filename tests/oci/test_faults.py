"""Fault cases against a real registry behind a tiny proxy in the test: 500s then success, 429
with Retry-After, a corrupted blob, the registry stopped in the middle of a download."""

from __future__ import annotations

import http.client
import http.server
import os
import threading

import pytest

from tests.oci.conftest import free_port, skopeo_copy, umoci_image
from tlimage.cache.cache import LayerCache
from tlimage.errors import OCIError
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import RegistryConfig

pytestmark = pytest.mark.slow


class Proxy:
    """Forwards to the registry; `faults` decides per request: ("status", code, headers),
    ("corrupt",) flips a byte of a blob body, ("cut", n) sends n bytes of it and hangs up."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list = []  # (path substring, fault), consumed once each
        self.seen: list[str] = []
        self.on_cut = None
        # The client's Host goes on: the registry's upload Locations then name the proxy, so
        # PATCH and PUT of uploads pass here too (counted, faultable).
        self.forward_host = False
        self.port = free_port()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # noqa: ANN002
                pass

            def _fault(self, size=None):
                for i, (needle, fault) in enumerate(proxy.faults):
                    if needle not in self.path:
                        continue
                    if (fault[0] == "status") != (size is None):
                        continue
                    if fault[0] == "body" and "/manifests/" not in self.path:
                        continue
                    if fault[0] == "cut" and size <= fault[1]:
                        continue  # only a body larger than the cut (the big layer)
                    if fault[0] == "corrupt" and size < 1 << 20:
                        continue
                    if fault[0] == "append" and size < 1 << 20:
                        continue
                    del proxy.faults[i]
                    return fault
                return None

            def _go(self):
                proxy.seen.append(f"{self.command} {self.path}")
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None  # read even when answering a fault
                fault = self._fault()
                if fault and fault[0] == "status":
                    self.send_response(fault[1])
                    for k, v in fault[2].items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() != "host" or proxy.forward_host}  # fmt: skip
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET":
                    fault = self._fault(len(data))
                if fault and fault[0] == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if fault and fault[0] == "append":
                    data = data + b"\0" * fault[1]
                if fault and fault[0] == "body":
                    data = fault[1]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault and fault[0] == "cut":
                    self.wfile.write(data[: fault[1]])
                    self.wfile.flush()
                    if proxy.on_cut:
                        proxy.on_cut()
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _go  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxied(registry, tmp_path):
    big = os.urandom(3 << 20)
    layout = umoci_image(
        tmp_path / "layout", "v1", [{"big.bin": big, "etc/": "", "etc/hostname": b"x\n"}]
    )
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/f/img:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    proxy = Proxy(registry.host)
    yield proxy
    proxy.close()


def _cfg(proxy, **kw):
    return RegistryConfig(insecure=(proxy.host,), certs_dirs=(), backoff=0.05, **kw)


def _stored(cache: LayerCache) -> list:
    return [r for r in cache.index.records() if r.key.startswith("oci-layer:")]


def test_500_then_success_and_429_retry_after(proxied, tmp_path):
    proxied.faults = [("/manifests/", ("status", 500, {})),
                      ("/blobs/", ("status", 503, {})),
                      ("/blobs/", ("status", 429, {"Retry-After": "0"}))]  # fmt: skip
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied))
        assert len(img.layers) == 1 and not proxied.faults


def test_persistent_500_gives_a_clear_error(proxied, tmp_path):
    proxied.faults = [("/manifests/", ("status", 500, {}))] * 10
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError, match=r"answered 500 .*3 times") as e:
            oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied, retries=2))
        assert f"{proxied.host}/f/img:v1" in str(e.value)


def test_corrupted_blob_is_refused_and_nothing_stored(proxied, tmp_path):
    # A corrupt body is retried as a broken transfer would not be: it is refused at once.
    proxied.faults = [("/blobs/sha256", ("corrupt",))] * 10
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError, match="hashes to|not valid"):
            oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied))
        assert _stored(cache) == []
        assert not [p for p in cache.store.blobs_dir.iterdir()]


def test_registry_stopped_mid_download(registry, proxied, tmp_path):
    proxied.faults = [("/blobs/sha256", ("cut", 1 << 20))] * 2
    proxied.on_cut = registry.stop
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError, match="cannot reach|broke off|ended after|answered 5"):
            oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied, retries=2))
        assert _stored(cache) == []
        assert not [p for p in cache.store.blobs_dir.iterdir()]


def test_interrupted_download_is_restarted(proxied, tmp_path):
    proxied.faults = [("/blobs/sha256", ("cut", 1 << 20))]
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied))
        assert img.downloaded == 1


def test_oversized_manifest_and_layer_are_refused(proxied, tmp_path):
    with LayerCache(tmp_path / "cache") as cache:
        proxied.faults = [("/manifests/", ("body", b"{" + b" " * (5 << 20) + b"}"))]
        with pytest.raises(OCIError, match="over the 4 MiB limit"):
            oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied))
        proxied.faults = [("/blobs/sha256", ("append", 4096))]
        with pytest.raises(OCIError, match="larger than its declared"):
            oci_pull.pull(f"{proxied.host}/f/img:v1", cache, config=_cfg(proxied))
        assert _stored(cache) == []


def test_a_failed_layer_leaves_no_blob_without_its_row(registry, tmp_path):
    """Two layers, the big one corrupt on every attempt: the pull fails naming the image; the
    small layer that arrived whole is kept under its row (no orphan blob, no temp file), and
    the next pull fetches only the missing layer. In parallel, the others stop at their next
    piece and leave nothing either."""
    import os as _os

    big = _os.urandom(3 << 20)
    layout = umoci_image(tmp_path / "layout", "v1",
                         [{"etc/": "", "etc/small": b"small\n"}, {"big.bin": big}])  # fmt: skip
    skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/f/two:v1",
                *registry.skopeo_flags("dest"))  # fmt: skip
    proxy = Proxy(registry.host)
    try:
        proxy.faults = [("/blobs/sha256", ("corrupt",))] * 10
        ref = f"{proxy.host}/f/two:v1"
        with LayerCache(tmp_path / "cache") as cache:
            with pytest.raises(OCIError, match="hashes to") as e:  # one layer at a time
                oci_pull.pull(ref, cache, config=_cfg(proxy), jobs=1)
            assert str(e.value).startswith(ref)
            rows = _stored(cache)
            blobs = sorted(p.name for p in cache.store.blobs_dir.iterdir())
            assert len(rows) == 1 and blobs == [rows[0].digest.split(":", 1)[1]], (rows, blobs)
            proxy.faults = []
            img = oci_pull.pull(ref, cache, config=_cfg(proxy))
            assert img.downloaded == 1 and len(img.layers) == 2
        with LayerCache(tmp_path / "cache2") as cache:
            proxy.faults = [("/blobs/sha256", ("corrupt",))] * 10
            with pytest.raises(OCIError, match="hashes to"):
                oci_pull.pull(ref, cache, config=_cfg(proxy))
            rows = {r.digest.split(":", 1)[1] for r in _stored(cache)}
            assert {p.name for p in cache.store.blobs_dir.iterdir()} == rows
    finally:
        proxy.close()
