"""Export to OCI layouts and docker-archives, read back by peers (skopeo, umoci, podman), and
import of layouts, archives and rootfs tarballs. The image is built by tlimage (fake executor
on the busybox seed base)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
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
         .run("write /etc/app.conf hello; mkdir /data; rm /etc/hostname; "
              "write /etc/os-release PRETTY_NAME=tlimage-exp")
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


def test_export_replaces_an_earlier_export_and_nothing_else(built, tmp_path):
    """`-o .` or `-o ~/project` must not delete a folder: only an empty folder or an earlier
    OCI layout is replaced; a file where a folder goes, or a folder where an archive goes, is
    an error naming it. Nothing of the user's is touched."""
    victim = tmp_path / "project"
    (victim / "src").mkdir(parents=True)
    (victim / "src/main.py").write_text("precious\n")
    afile = tmp_path / "notes"
    afile.write_text("keep\n")
    adir = tmp_path / "folder.tar"
    adir.mkdir()
    with LayerCache() as cache:
        img = local_image(built)
        for dest, kw, msg in [(victim, {}, "not empty and not an OCI image layout"),
                              (afile, {}, "not a folder"),
                              (adir, {}, "is a folder"),
                              (adir, {"fmt": "docker"}, "is a folder")]:  # fmt: skip
            with pytest.raises(OCIError, match=msg) as e:
                export_image(cache.store, img, dest, **kw)
            assert str(dest) in str(e.value)
        first = export_image(cache.store, img, tmp_path / "layout")
        assert export_image(cache.store, img, tmp_path / "layout", compression="gzip") != first
        empty = tmp_path / "empty"
        empty.mkdir()
        export_image(cache.store, img, empty)
        assert (empty / "oci-layout").is_file()
    assert (victim / "src/main.py").read_text() == "precious\n"
    assert afile.read_text() == "keep\n" and adir.is_dir()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_oci_tar_is_byte_identical_across_exports(built, tmp_path):
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), tmp_path / "a.tar")
        export_image(cache.store, local_image(built), tmp_path / "b.tar")
    assert sha(tmp_path / "a.tar") == sha(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert {"oci-layout", "index.json"} <= set(tf.getnames())


@pytest.mark.parametrize("form", ["oci-dir", "oci-tar", "oci-tar-gzip", "docker"])
def test_export_loads_and_runs_in_podman(built, tmp_path, podman, form):
    """Each export form is what `podman load` reads, and the image runs."""
    out = tmp_path / ("exp" if form == "oci-dir" else "exp.tar")
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), out, fmt="docker" if form == "docker"
                     else "oci", ref_name="test", repo_tag="localhost/exp:test",
                     compression="gzip" if form.endswith("gzip") else None)  # fmt: skip
    loaded = podman("load", "-i", str(out)).stdout
    image = "localhost/exp:test" if form == "docker" else loaded.split("Loaded image:")[-1].strip()
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert "MODE=prod" in info["Config"]["Env"] and info["Config"]["WorkingDir"] == "/data"
    assert len(info["RootFS"]["Layers"]) == len(built.manifest.layers)
    # The entrypoint is ["/bin/sh", "-c"]: the command is its script.
    assert podman.run(image, "cat /etc/os-release") == "PRETTY_NAME=tlimage-exp"
    assert podman.run(image, "cat /etc/app.conf; pwd") == "hello/data\n"


DOCKERFILE = """\
FROM busybox
COPY app/ /app/
COPY one.txt /etc/one.txt
RUN write /etc/os-release PRETTY_NAME=rep; mkdir /var/data
"""


def _build_on_a_fresh_machine(root: Path, mtime: int, umask: int, monkeypatch) -> dict:
    ctx = root / "ctx"
    (ctx / "app/sub").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    for rel, text, mode in [("one.txt", "one\n", 0o644), ("app/a.py", "print(1)\n", 0o755),
                            ("app/sub/b", "b\n", 0o600)]:  # fmt: skip
        (ctx / rel).write_text(text)
        os.chmod(ctx / rel, mode)
    for p in [ctx, *ctx.rglob("*")]:
        os.utime(p, (mtime, mtime))
    monkeypatch.setenv("TLIMAGE_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("TLIMAGE_STATE_DIR", str(root / "state"))
    old = os.umask(umask)
    try:
        rec = build_image(ctx / "Dockerfile", executor=FakeExecutor(), registered_name="rep").record
        with LayerCache(root / "cache") as cache:
            digest = export_image(cache.store, local_image(rec), root / "o.tar")
            export_image(cache.store, local_image(rec), root / "d.tar", fmt="docker")
            export_image(cache.store, local_image(rec), root / "layout", compression="gzip")
    finally:
        os.umask(old)
    return {"manifest": digest, "layers": [la.digest for la in rec.manifest.layers],
            "diff_ids": [la.diff_id for la in rec.manifest.layers],
            "blobs": sorted(p.name for p in (root / "layout/blobs/sha256").iterdir()),
            "oci.tar": sha(root / "o.tar"), "docker.tar": sha(root / "d.tar")}  # fmt: skip


def test_same_build_is_byte_identical_across_machines(tmp_path, monkeypatch):
    """Two machines: fresh cache folders (so the busybox base is built on each), context files
    with other mtimes, another umask. Layers, blobs, manifest digest and archives are equal."""
    a = _build_on_a_fresh_machine(tmp_path / "a", 1_000_000, 0o022, monkeypatch)
    b = _build_on_a_fresh_machine(tmp_path / "b", 1_700_000_000, 0o077, monkeypatch)
    assert a == b


def test_import_round_trips_and_rootfs_tarball(built, tmp_path):
    with LayerCache() as cache:
        export_image(cache.store, local_image(built), tmp_path / "o.tar")
        export_image(cache.store, local_image(built), tmp_path / "dir", compression="gzip")
        export_image(cache.store, local_image(built), tmp_path / "d.tar", fmt="docker")
        ours = unpack_layers(cache, built.manifest.layers, tmp_path / "ours")
    with LayerCache(tmp_path / "fresh") as cache:  # a second machine
        for src in ("o.tar", "dir", "d.tar"):
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
    assert {r.tag for r in Registry().list("default") if r.name == "back"} == {"o", "dir", "d"}


def _tar(path: Path, entries: list[tuple]) -> Path:
    """entries: (name,) a file, (name, "sym"|"hard", target)."""
    with tarfile.open(path, "w") as tf:
        for name, *link in entries:
            ti = tarfile.TarInfo(name)
            if link:
                ti.type = tarfile.SYMTYPE if link[0] == "sym" else tarfile.LNKTYPE
                ti.linkname = link[1]
                tf.addfile(ti)
            else:
                ti.size = 6
                tf.addfile(ti, io.BytesIO(b"pwned\n"))
    return path


def test_a_hostile_rootfs_tarball_never_touches_a_host_file(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    up = "../" * 30 + str(host).lstrip("/")
    with LayerCache(tmp_path / "cache") as cache:
        with pytest.raises(OCIError, match=r"dotdot\.tar: .*leaves the tree"):
            import_image(cache, _tar(tmp_path / "dotdot.tar", [(f"{up}/a",)]))
        # Absolute names and links out of the tree stay inside it, as Docker resolves them.
        for name, entries in {
            "abs": [(f"{host}/b",)],
            "symlink": [("etc", "sym", str(host)), ("etc/c",)],
            "relsymlink": [("x", "sym", up), ("x/d",)],
        }.items():
            img = import_image(cache, _tar(tmp_path / f"{name}.tar", entries))
            root = unpack_layers(cache, img.layers, tmp_path / f"root-{name}")
            assert any(p.is_file() for p in root.rglob("*") if not p.is_symlink())
    assert os.listdir(host) == []


def test_a_rootfs_hard_link_must_name_an_earlier_entry(tmp_path):
    """A root filesystem tarball is a layer on its own: a hard link to a path it does not hold
    (the host's /etc/shadow, or a later entry) is refused at import, naming the file, rather
    than at the first build or sandbox that unpacks it; a link to an earlier entry imports."""
    with LayerCache(tmp_path / "cache") as cache:
        for name, entries in {
            "outside": [("etc/",), ("etc/shadow", "hard", "/etc/shadow")],
            "later": [("b", "hard", "./a"), ("a",)],
        }.items():
            path = _tar(tmp_path / f"{name}.tar", [e for e in entries if e != ("etc/",)])
            with pytest.raises(OCIError, match=rf"{name}\.tar: .*hard link .* not earlier"):
                import_image(cache, path)
        img = import_image(cache, _tar(tmp_path / "ok.tar", [("./a",), ("b", "hard", "a")]))
        root = unpack_layers(cache, img.layers, tmp_path / "root-ok")
        assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


def _layout(path: Path, index: object, blobs: dict[str, bytes] = {}) -> Path:  # noqa: B006
    (path / "blobs/sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    for name, data in blobs.items():
        (path / "blobs/sha256" / name).write_bytes(data)
    return path


def test_import_names_the_file_for_malformed_or_hostile_layouts(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"schemaVersion": 2}')
    out = "../" * 3 + "secret.json"
    cases = {
        "traversal": ({"manifests": [{"digest": f"sha256:{out}", "size": 1}]},
                      r"index\.json names an invalid digest"),
        "no-digest": ({"manifests": [{"size": 1}]}, "missing or malformed field 'digest'"),
        "not-json": ("{nope", "JSON"),
        "wrong-shape": ({"manifests": "x"}, "malformed"),
    }  # fmt: skip
    with LayerCache(tmp_path / "cache") as cache:
        for name, (index, msg) in cases.items():
            path = _layout(tmp_path / name, index)
            with pytest.raises(OCIError, match=msg) as e:
                import_image(cache, path)
            assert str(path) in str(e.value)
        # A config digest out of the layout is refused before any file is read.
        manifest = json.dumps({"schemaVersion": 2, "config": {"digest": f"sha256:{out}"},
                               "layers": []}).encode()  # fmt: skip
        digest = hashlib.sha256(manifest).hexdigest()
        path = _layout(tmp_path / "cfg", {"manifests": [{"digest": f"sha256:{digest}"}]},
                       {digest: manifest})  # fmt: skip
        with pytest.raises(OCIError, match="config names an invalid digest"):
            import_image(cache, path)
        # A docker-archive whose manifest.json lacks the config.
        arch = tmp_path / "docker.tar"
        with tarfile.open(arch, "w") as tf:
            data = json.dumps([{"Layers": []}]).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        with pytest.raises(OCIError, match=f"{arch}: .*field 'Config'"):
            import_image(cache, arch)
    # Through the CLI: the error, no traceback, exit 1.
    proc = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", "import",
                           str(tmp_path / "traversal"), "-n", "x"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'traversal'}: index.json names an invalid digest" in proc.stderr


def test_cli_export_names_the_image_for_podman_and_import_picks_it(built, tmp_path, podman):
    """`tl sbx image export NAME:TAG -o F.tar`: `podman load` names it localhost/NAME:TAG (as
    it names what `podman save` wrote); `import F.tar:NAME:TAG` and `F.tar:TAG` pick it."""

    def tl(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", *args],
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    tl("export", "exp", "-o", "exp.tar")
    loaded = podman("load", "-i", str(tmp_path / "exp.tar")).stdout
    assert "Loaded image: localhost/exp:latest" in loaded
    assert podman.run("localhost/exp:latest", "cat /etc/app.conf") == "hello"
    skopeo = subprocess.run(["skopeo", "inspect", f"oci-archive:{tmp_path / 'exp.tar'}:exp:latest"],
                            capture_output=True, text=True)  # fmt: skip
    assert skopeo.returncode == 0, skopeo.stderr
    assert "as exp:latest " in tl("import", "exp.tar:exp:latest")
    assert "as again:1 " in tl("import", "exp.tar:latest", "-n", "again:1")


def test_import_never_replaces_an_image_of_another_source_unasked(built, tmp_path):
    """`import -n NAME` where NAME holds an image built from a file is refused (exit 2, naming
    both); the same archive imported again updates its own name; --replace takes the name."""

    def tl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tlimage", "sbx", "image", *args],
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip

    rootfs = _tar(tmp_path / "rootfs.tar", [("etc/",), ("etc/os-release",)])
    proc = tl("import", str(rootfs), "-n", "exp")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "exp:latest" in proc.stderr and str(tmp_path / "image.py") in proc.stderr
    assert "--replace" in proc.stderr
    assert Registry().get("default", "exp").image_id == built.image_id
    assert tl("import", str(rootfs), "-n", "mine").returncode == 0
    assert tl("import", str(rootfs), "-n", "mine").returncode == 0  # its own name: updated
    proc = tl("import", str(rootfs), "-n", "exp", "--replace")
    assert proc.returncode == 0, proc.stderr
    assert Registry().get("default", "exp").image_id != built.image_id
