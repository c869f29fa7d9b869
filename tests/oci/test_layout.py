"""Export to OCI layouts and docker-archives, read back by peers (skopeo, umoci, podman), and
import of layouts, archives and rootfs tarballs. The image is built by tlimage (fake executor
on the busybox seed base)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.oci.conftest import need
from tests.oci.test_pull import tree, umoci_rootfs, unpack_layers
from tlimage.builder import build_image
from tlimage.builder.images import local_image, register_pulled
from tlimage.cache.cache import LayerCache
from tlimage.errors import OCIError
from tlimage.executor.fake import FakeExecutor
from tlimage.oci.layout import export_image, import_image
from tlimage.registry import Registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root"),
]

IMAGE = """\
from tlimage import Image
image = (Image("exp", base_image="busybox")
         .run("write /etc/app.conf hello; mkdir /data; rm /etc/hostname")
         .env("MODE", "prod").workdir("/data").entrypoint(["/bin/sh", "-c"]).cmd(["echo hi"]))
"""


@pytest.fixture
def built(tmp_path):
    (tmp_path / "image.py").write_text(IMAGE)
    result = build_image(tmp_path / "image.py", executor=FakeExecutor())
    return result.record


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_oci_layout_read_by_skopeo_and_umoci(built, tmp_path):
    need("skopeo", "umoci")
    with LayerCache() as cache:
        ours = unpack_layers(cache, built.manifest.layers, tmp_path / "ours")
        img = local_image(built)
        # zstd (the default): skopeo reads it; gzip: umoci 0.4 unpacks it.
        export_image(cache.store, img, tmp_path / "zst", ref_name="v1")
        digest = export_image(cache.store, img, tmp_path / "gz", ref_name="v1",
                              compression="gzip")  # fmt: skip
        again = export_image(cache.store, img, tmp_path / "gz2", ref_name="v1",
                             compression="gzip")  # fmt: skip
    assert digest == again  # reproducible
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci:{tmp_path / 'zst'}:v1"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert "MODE=prod" in info["Env"] and len(info["Layers"]) == len(built.manifest.layers)
    cfg = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", f"oci:{tmp_path / 'gz'}:v1"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert cfg["config"]["WorkingDir"] == "/data"
    assert cfg["config"]["Entrypoint"] == ["/bin/sh", "-c"] and cfg["config"]["Cmd"] == ["echo hi"]
    theirs = umoci_rootfs(tmp_path / "gz", "v1", tmp_path / "umoci")
    assert tree(ours) == tree(theirs)
    assert not (theirs / "etc/hostname").exists()


def test_oci_tar_is_byte_identical_across_exports(built, tmp_path):
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), tmp_path / "a.tar")
        export_image(cache.store, local_image(built), tmp_path / "b.tar")
    assert sha(tmp_path / "a.tar") == sha(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert {"oci-layout", "index.json"} <= set(tf.getnames())


def test_docker_archive_loads_in_podman(built, tmp_path):
    need("podman")
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), tmp_path / "d.tar", fmt="docker",
                     repo_tag="localhost/exp:test")  # fmt: skip
    root = tmp_path / "podman"
    run = Path(tempfile.mkdtemp(prefix="tlp-", dir="/tmp"))  # podman: runroot < 50 characters
    base = ["podman", "--root", str(root / "root"), "--runroot", str(run),
            "--storage-driver", "vfs"]  # fmt: skip
    proc = subprocess.run([*base, "load", "-i", str(tmp_path / "d.tar")], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(
        subprocess.run(
            [*base, "image", "inspect", "localhost/exp:test"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "MODE=prod" in out[0]["Config"]["Env"]
    assert len(out[0]["RootFS"]["Layers"]) == len(built.manifest.layers)
    subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True)
    shutil.rmtree(run, ignore_errors=True)


def test_import_round_trips_and_rootfs_tarball(built, tmp_path):
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), tmp_path / "o.tar")
        export_image(cache.store, local_image(built), tmp_path / "d.tar", fmt="docker")
        ours = unpack_layers(cache, built.manifest.layers, tmp_path / "ours")
    with LayerCache(tmp_path / "fresh") as cache:  # a second machine
        for src in ("o.tar", "d.tar"):
            img = import_image(cache, tmp_path / src)
            assert [la.diff_id for la in img.layers] == [la.diff_id for la in built.manifest.layers]
            rec = register_pulled(img, "default", "back", src.split(".")[0])
            assert rec.manifest.config["env"] == built.manifest.config["env"]
            assert rec.manifest.config["cmd"] == built.manifest.config["cmd"]
        theirs = unpack_layers(cache, img.layers, tmp_path / "imported")
        assert tree(ours) == tree(theirs)
        # A plain rootfs tarball is one layer.
        rootfs = tmp_path / "rootfs.tar.gz"
        subprocess.run(["tar", "-czf", str(rootfs), "-C", str(ours), "."], check=True)
        img = import_image(cache, rootfs)
        assert len(img.layers) == 1
        flat = unpack_layers(cache, img.layers, tmp_path / "flat")
        assert tree(flat) == tree(ours)
        # A corrupted layout blob is refused, nothing registered.
        bad = tmp_path / "bad"
        with LayerCache() as c2:
            export_image(c2.store, local_image(built), bad)
        blobs = sorted((bad / "blobs/sha256").iterdir(), key=lambda p: -p.stat().st_size)
        data = bytearray(blobs[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        blobs[0].write_bytes(bytes(data))
        with pytest.raises(OCIError, match="hashes to|not valid|does not match"):
            import_image(cache, bad)
    assert {r.tag for r in Registry().list("default") if r.name == "back"} == {"o", "d"}
