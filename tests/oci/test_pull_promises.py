"""Pull promises of issue #12 not covered elsewhere, each against a real registry
(docker-registry): mirrors falling back to the next endpoint, 429 Retry-After honoured,
connection resets, foreign layers, wrong credentials from $REGISTRY_AUTH_FILE named, the CLI's
--registry-auth with --json pull events, and a pulled base's Entrypoint/Cmd/Healthcheck
inherited as BuildKit does."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.oci.conftest import Reg, _config, free_port, skopeo_copy, umoci_image
from tests.oci.test_faults import Proxy
from tlimage.cache.cache import LayerCache
from tlimage.errors import OCIError
from tlimage.oci import pull as oci_pull
from tlimage.oci.client import (
    OCI_CONFIG,
    OCI_MANIFEST,
    RegistryClient,
    RegistryConfig,
)
from tlimage.oci.reference import parse

pytestmark = pytest.mark.slow

LAYERS_ONE = [{"etc/": "", "etc/os-release": b"ID=test\n", "bin/": "", "bin/tool": b"x\n"}]


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def cfg(*hosts: str, **kw) -> RegistryConfig:
    kw.setdefault("backoff", 0.05)
    return RegistryConfig(insecure=hosts, certs_dirs=(), **kw)


@pytest.fixture
def image(registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    ref = f"{registry.host}/m/img:v1"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}", *registry.skopeo_flags("dest"))
    return ref


def test_mirrors_fall_back_to_the_next_endpoint_at_once(registry, image, tmp_path):
    """A dead mirror (nothing listens) is left after one attempt, not after the retries and
    their back-off; an empty mirror (a real registry without the image) answers 404; the
    registry itself then serves the image."""
    root = tmp_path / "empty"
    root.mkdir()
    port = free_port()
    empty = Reg(f"127.0.0.1:{port}", root, None, _config(root, port))
    empty.start()
    dead = f"127.0.0.1:{free_port()}"
    try:
        conf = cfg(registry.host, empty.host, dead, backoff=0.5, retries=4,
                   mirrors={registry.host: (dead, empty.host)})  # fmt: skip
        with LayerCache(tmp_path / "cache") as cache:
            t0 = time.monotonic()
            img = oci_pull.pull(image, cache, config=conf)
            took = time.monotonic() - t0
        assert len(img.layers) == 1 and img.downloaded == 1
        assert took < 3.0, f"the dead mirror held the pull {took:.1f}s"
        # Nothing anywhere: the error names every endpoint tried and the reference.
        with LayerCache(tmp_path / "cache") as cache:
            with pytest.raises(OCIError) as e:
                oci_pull.pull(f"{registry.host}/m/none:v1", cache, config=conf)
        msg = str(e.value)
        assert msg.startswith(f"{registry.host}/m/none:v1: unknown image or tag 'v1'")
        assert f"mirror {dead}" in msg and f"{empty.host}: not found" in msg
    finally:
        empty.stop()


def test_429_waits_for_retry_after_then_gives_up_clearly(registry, image, tmp_path):
    proxy = Proxy(registry.host)
    try:
        ref = image.replace(registry.host, proxy.host)
        proxy.faults = [("/manifests/", ("status", 429, {"Retry-After": "1"}))]
        with LayerCache(tmp_path / "cache") as cache:
            t0 = time.monotonic()
            oci_pull.pull(ref, cache, config=cfg(proxy.host))
            assert time.monotonic() - t0 >= 1.0  # the back-off alone would be 0.05 s
        proxy.faults = [("/manifests/", ("status", 429, {"Retry-After": "0"}))] * 10
        with LayerCache(tmp_path / "cache2") as cache:
            with pytest.raises(OCIError) as e:
                oci_pull.pull(ref, cache, config=cfg(proxy.host, retries=2))
        assert str(e.value).startswith(ref) and "answered 429" in str(e.value)
        assert "3 times" in str(e.value) and "try again later" in e.value.hint
    finally:
        proxy.close()


class ResettingProxy(Proxy):
    """The fault proxy, whose `resets` first connections are answered by a TCP reset as soon
    as a request arrives."""

    def __init__(self, upstream: str, resets: int) -> None:
        super().__init__(upstream)
        self.resets = resets
        handler = self.server.RequestHandlerClass
        proxy = self

        class Resetting(handler):  # type: ignore[misc, valid-type]
            def handle_one_request(self):  # noqa: ANN202
                if proxy.resets > 0:
                    proxy.resets -= 1
                    self.rfile.readline()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))  # fmt: skip
                    self.close_connection = True
                    return
                super().handle_one_request()

        self.server.RequestHandlerClass = Resetting


def test_connection_resets_are_retried_then_reported(registry, image, tmp_path):
    proxy = ResettingProxy(registry.host, resets=2)
    try:
        ref = image.replace(registry.host, proxy.host)
        with LayerCache(tmp_path / "cache") as cache:
            img = oci_pull.pull(ref, cache, config=cfg(proxy.host))
            assert img.downloaded == 1 and proxy.resets == 0
        proxy.resets = 100
        with LayerCache(tmp_path / "cache2") as cache:
            with pytest.raises(OCIError) as e:
                oci_pull.pull(ref, cache, config=cfg(proxy.host, retries=2))
            assert not list(cache.store.blobs_dir.iterdir())
        msg = str(e.value)
        assert msg.startswith(ref) and f"cannot reach {proxy.host} after 3 attempts" in msg
    finally:
        proxy.close()


def test_foreign_layers_are_refused_before_anything_is_fetched(registry, tmp_path):
    config = json.dumps({"architecture": "amd64", "os": "windows", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(b"x")]}}).encode()  # fmt: skip
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
               "digest": sha(b"remote"), "size": 6,
               "urls": ["https://example.invalid/layer"]}  # fmt: skip
    ref = f"{registry.host}/win/base:ltsc"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [foreign],
    }).encode()  # fmt: skip
    with RegistryClient(cfg(registry.host)) as c:
        ep = c.endpoints(parse(ref), write=True)[0]
        c.upload_blob(ep, sha(config), len(config), lambda: iter([config]), label=ref)
        c.put_manifest(ep, "ltsc", manifest, OCI_MANIFEST, label=ref)
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError) as e:
            oci_pull.pull(ref, cache, config=cfg(registry.host))
        assert not list(cache.store.blobs_dir.iterdir())
    assert str(e.value).startswith(ref) and "foreign (non-distributable) layer" in str(e.value)


def _private_image_and_wrong_auth(tls_registry, tmp_path: Path) -> tuple[str, Path]:
    """An image in the TLS + htpasswd registry, and an auth file with a wrong password for
    it."""
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    ref = f"{tls_registry.host}/priv/img:v1"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}", *tls_registry.skopeo_flags("dest"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {"auths": {tls_registry.host: {"auth": base64.b64encode(b"alice:nope").decode()}}}
        )
    )
    return ref, wrong


def test_wrong_credentials_from_registry_auth_file_are_named(tls_registry, tmp_path,
                                                             monkeypatch):  # fmt: skip
    ref, wrong = _private_image_and_wrong_auth(tls_registry, tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker/config.json of the machine's
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(wrong))
    conf = RegistryConfig(certs_dirs=(str(tls_registry.certs_dir),), retries=0)
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError) as e:
            oci_pull.pull(ref, cache, config=conf)
        msg = str(e.value)
        assert msg.startswith(ref) and f"access to {tls_registry.host} denied (401)" in msg
        assert f"credentials tried: {wrong} ({tls_registry.host})" in msg
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tls_registry.auth_file))
        assert len(oci_pull.pull(ref, cache, config=conf).layers) == 1


def tl(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root")
def test_cli_registry_auth_and_json_pull_events(tls_registry, tmp_path):
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    ref = f"{tls_registry.host}/priv/img:v1"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}", *tls_registry.skopeo_flags("dest"))
    env = {**os.environ, "HOME": str(tmp_path), "TLIMAGE_CACHE_DIR": str(tmp_path / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state"),
           "TLIMAGE_REGISTRY_CERTS_DIR": str(tls_registry.certs_dir)}  # fmt: skip
    env.pop("REGISTRY_AUTH_FILE", None)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\nLABEL built=yes\n")
    out = tl("sbx", "image", "create", "Dockerfile", "-n", "app", cwd=ctx, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"Dockerfile:1:1: {ref}: " in out.stderr and "user name and password" in out.stderr
    assert "   1 | FROM" in out.stderr
    out = tl("sbx", "image", "create", "Dockerfile", "-n", "app", "--json", "--registry-auth",
             str(tls_registry.auth_file), cwd=ctx, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert "pull_started" in kinds and "pull_done" in kinds
    layer = [e for e in events if e["event"] == "pull_layer" and e["status"] == "done"]
    assert layer and layer[0]["bytes"] == layer[0]["total"] > 0


def test_pulled_entrypoint_cmd_and_healthcheck_are_inherited(registry, tmp_path):
    """As BuildKit: the base's Entrypoint, Cmd, Healthcheck, User, StopSignal and Labels carry
    over; a new ENTRYPOINT resets the inherited Cmd."""
    from tlimage.builder import build_image
    from tlimage.executor.fake import FakeExecutor

    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    src = f"{registry.host}/cfg/src:v1"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{src}", *registry.skopeo_flags("dest"))
    with RegistryClient(cfg(registry.host)) as c:
        fetched, ep = c.get_manifest(parse(src))
        manifest = json.loads(fetched.data)
        config = json.loads(c.get_blob_bytes(ep, manifest["config"]["digest"],
                                             manifest["config"]["size"], label=src))  # fmt: skip
        config["config"].update({
            "Entrypoint": ["/bin/tool"], "Cmd": ["--serve"], "User": "app:app",
            "StopSignal": "SIGTERM", "Labels": {"a": "b"}, "ExposedPorts": {"80/tcp": {}},
            "Healthcheck": {"Test": ["CMD", "/bin/tool", "--check"], "Interval": 30_000_000_000,
                            "Retries": 3},
        })  # fmt: skip
        data = json.dumps(config).encode()
        manifest["config"].update(digest=sha(data), size=len(data))
        c.upload_blob(ep, sha(data), len(data), lambda: iter([data]), label=src)
        c.put_manifest(ep, "hc", json.dumps(manifest).encode(), fetched.media_type,
                       label=src)  # fmt: skip
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    conf = cfg(registry.host)
    (ctx / "Dockerfile").write_text(f"FROM {registry.host}/cfg/src:hc\nLABEL c=d\n")
    got = build_image(ctx / "Dockerfile", executor=FakeExecutor(),
                      registry_config=conf).manifest.config  # fmt: skip
    assert got["entrypoint"] == ["/bin/tool"] and got["cmd"] == ["--serve"]
    assert got["user"] == "app:app" and got["stopsignal"] == "SIGTERM"
    assert got["labels"] == {"a": "b", "c": "d"} and got["exposed_ports"] == ["80/tcp"]
    assert got["healthcheck"]["test"] == ["CMD", "/bin/tool", "--check"]
    assert got["healthcheck"]["retries"] == 3 and got["healthcheck"]["interval"]
    (ctx / "Dockerfile").write_text(f'FROM {registry.host}/cfg/src:hc\nENTRYPOINT ["/x"]\n')
    got = build_image(ctx / "Dockerfile", executor=FakeExecutor(),
                      registry_config=conf).manifest.config  # fmt: skip
    assert got["entrypoint"] == ["/x"] and not got.get("cmd")


def test_docker_schema2_manifest_list_and_an_uncompressed_layer(registry, tmp_path):
    """An image in Docker's media types (skopeo --format v2s2) behind a Docker manifest list
    whose arm64 entry carries variant v8, and an uncompressed (plain tar) OCI layer: all pull,
    and the trees equal umoci's own unpack."""
    import io
    import tarfile

    from tests.oci.test_pull import tree, umoci_rootfs, unpack_layers
    from tlimage.oci.client import DOCKER_LIST, DOCKER_MANIFEST, OCI_LAYER

    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    ref = f"{registry.host}/d/img"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}:v2s2", "--format", "v2s2",
                *registry.skopeo_flags("dest"))  # fmt: skip
    with RegistryClient(cfg(registry.host)) as c:
        fetched, ep = c.get_manifest(parse(f"{ref}:v2s2"))
        assert fetched.media_type == DOCKER_MANIFEST
        entry = {"mediaType": DOCKER_MANIFEST, "digest": fetched.digest,
                 "size": len(fetched.data)}  # fmt: skip
        index = {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {**entry, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
            ],
        }
        c.put_manifest(ep, "list", json.dumps(index).encode(), DOCKER_LIST, label=ref)
        # A plain-tar layer, as some tools push them.
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            ti = tarfile.TarInfo("plain.txt")
            ti.size = 5
            tf.addfile(ti, io.BytesIO(b"plain"))
        tar = buf.getvalue()
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()  # fmt: skip
        for b in (tar, config):
            c.upload_blob(ep, sha(b), len(b), lambda b=b: iter([b]), label=ref)
        plain = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha(tar), "size": len(tar)}],
        }).encode()  # fmt: skip
        c.put_manifest(ep, "plain", plain, OCI_MANIFEST, label=ref)
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(f"{ref}:list", cache, config=cfg(registry.host),
                            platform="linux/arm64/v8")  # fmt: skip
        assert img.digest == fetched.digest and img.index_digest
        ours = unpack_layers(cache, img.layers, tmp_path / "ours")
        with pytest.raises(OCIError, match=r"no image for platform linux/amd64; the index has: "
                           r"linux/arm64$"):  # fmt: skip
            oci_pull.pull(f"{ref}:list", cache, config=cfg(registry.host))
        flat = oci_pull.pull(f"{ref}:plain", cache, config=cfg(registry.host))
        out = unpack_layers(cache, flat.layers, tmp_path / "plain")
        assert (out / "plain.txt").read_bytes() == b"plain"
    assert tree(ours) == tree(umoci_rootfs(layout, "v1", tmp_path / "umoci"))


def test_a_reference_pinned_to_an_index_digest_is_reused_offline(registry, image, tmp_path):
    """`FROM name@sha256:<index>` (the digest Docker Hub shows): once resolved for a platform,
    later pulls need no registry, as a tag's resolution is reused."""
    with RegistryClient(cfg(registry.host)) as c:
        fetched, ep = c.get_manifest(parse(image))
        entry = {"mediaType": fetched.media_type, "digest": fetched.digest,
                 "size": len(fetched.data), "platform": {"os": "linux", "architecture": "amd64"}}  # fmt: skip
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": [entry]}).encode()  # fmt: skip
        c.put_manifest(ep, "multi", index, "application/vnd.oci.image.index.v1+json", label=image)
    pinned = f"{registry.host}/m/img@{sha(index)}"
    with LayerCache(tmp_path / "cache") as cache:
        img = oci_pull.pull(pinned, cache, config=cfg(registry.host))
        assert img.digest == fetched.digest and not img.offline
        registry.stop()
        again = oci_pull.pull(pinned, cache, config=cfg(registry.host, retries=0))
        assert again.offline and again.digest == fetched.digest


def test_a_blob_the_mirror_lacks_comes_from_the_next_endpoint(registry, image, tmp_path):
    """The mirror (a real registry) has the manifest but lost a layer blob (deleted through the
    registry API): that blob is read from the registry itself, the rest from the mirror."""
    root = tmp_path / "mirror"
    root.mkdir()
    port = free_port()
    mirror = Reg(f"127.0.0.1:{port}", root, None, _config(root, port))
    mirror.start()
    try:
        path = image.split("/", 1)[1]
        skopeo_copy(f"docker://{image}", f"docker://{mirror.host}/{path}", "--src-tls-verify=false",
                    *mirror.skopeo_flags("dest"))  # fmt: skip
        with RegistryClient(cfg(mirror.host)) as c:
            fetched, ep = c.get_manifest(parse(f"{mirror.host}/{path}"))
            layer = json.loads(fetched.data)["layers"][0]["digest"]
            resp = c.request("DELETE", ep, f"{ep.repository}/blobs/{layer}", ok=(202,),
                             scope=f"repository:{ep.repository}:pull,push,delete")  # fmt: skip
            assert resp.status_code == 202
        conf = cfg(registry.host, mirror.host, mirrors={registry.host: (mirror.host,)})
        events: list[dict] = []
        with LayerCache(tmp_path / "cache") as cache:
            img = oci_pull.pull(image, cache, config=conf, progress=events.append)
            assert img.downloaded == 1
        said = [e["message"] for e in events if e["event"] == "status"]
        assert said and f"mirror {mirror.host}" in said[0] and layer in said[0]
    finally:
        mirror.stop()


def test_sbx_new_image_takes_the_registry_flags(tls_registry, tmp_path):
    """`tl sbx new --image <registry ref>` reads credentials from --registry-auth as `create`
    does: a wrong file given there is the one the error names (no sandbox is started)."""
    ref, wrong = _private_image_and_wrong_auth(tls_registry, tmp_path)
    env = {**os.environ, "HOME": str(tmp_path), "TLIMAGE_CACHE_DIR": str(tmp_path / "cache"),
           "TLIMAGE_STATE_DIR": str(tmp_path / "state"),
           "TLIMAGE_REGISTRY_CERTS_DIR": str(tls_registry.certs_dir)}  # fmt: skip
    env.pop("REGISTRY_AUTH_FILE", None)
    out = tl("sbx", "new", "--image", ref, "--registry-auth", str(wrong), "--platform",
             "linux/amd64", cwd=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert ref in out.stderr and f"credentials tried: {wrong} ({tls_registry.host})" in out.stderr


def test_token_server_refusing_wrong_credentials_names_them(token_registry, tmp_path):
    """Docker Hub-style auth: the token server refuses the credentials of an auth file; the
    error names the reference, the realm, the scope asked for and the file tried."""
    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    ref = f"{token_registry.host}/private/img:v1"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}", "--dest-tls-verify=false",
                "--dest-creds=bob:pw")  # fmt: skip
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {"auths": {token_registry.host: {"auth": base64.b64encode(b"bob:nope").decode()}}}
        )
    )
    conf = RegistryConfig(insecure=(token_registry.host,), certs_dirs=(), retries=0,
                          auth_files=(str(wrong),))  # fmt: skip
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError) as e:
            oci_pull.pull(ref, cache, config=conf)
    msg = str(e.value)
    assert msg.startswith(ref) and "the token server http://127.0.0.1:" in msg
    assert "refused access to repository:private/img:pull (401)" in msg
    assert f"credentials tried: {wrong} ({token_registry.host})" in msg


def test_a_plain_http_registry_not_named_insecure_is_refused_with_the_flag_to_use(
    registry, image, tmp_path
):
    """TLS is the default: a registry that speaks plain HTTP is not reached over it unless
    named with --insecure-registry, and the error says so."""
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError) as e:
            oci_pull.pull(image, cache, config=RegistryConfig(certs_dirs=(), retries=0))
        assert not list(cache.store.blobs_dir.iterdir())
    assert str(e.value).startswith(f"{image}: cannot reach {registry.host}")
    assert (
        e.value.hint
        == f"the registry speaks plain HTTP? name it with --insecure-registry {registry.host}"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root")
def test_a_pulled_image_never_takes_a_name_the_user_built(registry, tmp_path):
    """`tl sbx new --image HOST/x/img:v1` registers the pull as img:v1 — unless img:v1 holds an
    image the user built: then under the whole reference's name, and the built one stays."""
    from tlimage.builder import build_image
    from tlimage.builder.images import registered_or_pulled
    from tlimage.executor.fake import FakeExecutor
    from tlimage.registry import Registry

    layout = umoci_image(tmp_path / "layout", "v1", LAYERS_ONE)
    for repo in ("x/img", "y/other"):
        skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/{repo}:v1",
                    *registry.skopeo_flags("dest"))  # fmt: skip
    (tmp_path / "image.py").write_text(
        'from tlimage import Image\nimage = Image("img", tag="v1", base_image="busybox")'
        '.env("MINE", "1")\n'
    )
    mine = build_image(tmp_path / "image.py", executor=FakeExecutor()).record
    conf = RegistryConfig(insecure=(registry.host,), certs_dirs=())
    ref = f"{registry.host}/x/img:v1"
    got = registered_or_pulled("default", ref, registry_config=conf)
    assert got == f"{registry.host.replace(':', '-')}-x-img:v1"
    assert Registry().get("default", "img:v1").image_id == mine.image_id
    assert registered_or_pulled("default", ref, registry_config=conf) == got  # its own now
    assert registered_or_pulled("default", f"{registry.host}/y/other:v1",
                                registry_config=conf) == "other:v1"  # fmt: skip
