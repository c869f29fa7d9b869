"""RUN mounts end to end on the real busybox base, through both backends (the namespace sandbox
and the microVM, which carries mounts as disks and protocol v3 BIND requests), plus one real
`pip` step on debian-minimal when PyPI is reachable: what the step sees, what persists, and that
nothing a mount shows reaches a layer, a key or the logs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tlimage.builder import build_image
from tlimage.builder.mounts import cache_mount_dir
from tlimage.cache.store import BlobStore
from tlimage.cache.unpacked import unpacked_layer
from tlimage.errors import StepFailed, TlimageError

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
    pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                       reason="busybox-static is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

SECRET = b"hunter2-very-secret"


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The user's cache (computed before conftest gives each test its own), where the guest
    kit and debian-minimal are made once: that takes minutes."""
    from tlimage.cache.store import default_cache_root

    return Path(os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE") or default_cache_root())


@pytest.fixture(scope="session")
def microvm(shared_cache: Path):  # noqa: ANN201
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed (scripts/setup.sh installs it)")
    from tlimage.executor.microvm import MicroVMExecutor

    ex = MicroVMExecutor(cache_dir=shared_cache)
    yield ex
    ex.close()


@pytest.fixture(params=["namespace", "microvm"])
def build(request: pytest.FixtureRequest):  # noqa: ANN201
    """`build(path, **options)` through a fresh namespace sandbox, or the session's microVM."""
    backend = ({"isolation": "namespace"} if request.param == "namespace"
               else {"executor": request.getfixturevalue("microvm")})  # fmt: skip
    return lambda path, **kw: ns_build(path, **{**backend, **kw})


def ns_build(path: Path, **kw):  # noqa: ANN201
    events: list[dict] = []
    result = build_image(path, emit=events.append, **{"isolation": "namespace", **kw})
    return result, events


def logs(events: list[dict], index: int | None = None) -> str:
    return "".join(e["data"] for e in events if e["event"] == "build_log"
                   and (index is None or e["index"] == index))  # fmt: skip


def executed(events: list[dict]) -> list[int]:
    return [e["index"] for e in events if e["event"] == "step_done" and not e.get("config_only")]


def added_paths(result, store: BlobStore | None = None) -> set[str]:  # noqa: ANN001
    """Every path in the layers the build added over its base."""
    store = store or BlobStore()
    out: set[str] = set()
    for la in result.manifest.layers[1:]:
        root = unpacked_layer(store, la.digest)
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def added_bytes(result) -> bytes:  # noqa: ANN001
    store = BlobStore()
    out = b""
    for la in result.manifest.layers[1:]:
        root = unpacked_layer(store, la.digest)
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    out += Path(p).read_bytes()
    return out


def dockerfile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "Dockerfile"
    p.write_text(text)
    return p


def test_cache_mount_speeds_the_second_install_and_stays_out_of_the_layer(
    tmp_path: Path, build
) -> None:  # noqa: ANN001
    step = (
        "RUN --mount=type=cache,target=/var/cache/pkgs "
        "if [ -f /var/cache/pkgs/pkg.whl ]; then echo using cached pkg.whl; "
        "else echo downloading; head -c 65536 /dev/urandom > /var/cache/pkgs/pkg.whl; fi; "
        "mkdir -p /opt && cp /var/cache/pkgs/pkg.whl /opt/ && echo {n} > /opt/n\n"
    )
    path = dockerfile(tmp_path, "FROM busybox\n" + step.format(n=1))
    first, ev1 = build(path)
    assert logs(ev1) == "downloading\n"
    cached = cache_mount_dir(BlobStore().path, "/var/cache/pkgs") / "0" / "pkg.whl"
    assert cached.stat().st_size == 65536
    # the mount point did not exist in the base: no /var/cache (nor anything below) in the layer
    assert added_paths(first) == {"opt", "opt/pkg.whl", "opt/n"}
    path.write_text("FROM busybox\n" + step.format(n=2))
    second, ev2 = build(path)
    assert logs(ev2) == "using cached pkg.whl\n"
    assert added_paths(second) == {"opt", "opt/pkg.whl", "opt/n"}
    assert cached.read_bytes() in added_bytes(second)


def test_secret_file_and_env_reach_the_step_only(tmp_path: Path, build) -> None:  # noqa: ANN001
    f = tmp_path / "token.txt"
    f.write_bytes(SECRET)
    path = dockerfile(
        tmp_path,
        "FROM busybox\n"
        "RUN --mount=type=secret,id=tok,uid=1000,mode=0440 "
        "stat -c '%a %u' /run/secrets/tok && cat /run/secrets/tok && echo && "
        'test "$(cat /run/secrets/tok)" = hunter2-very-secret && '
        "echo built > /built && ! ls /run/secrets/tok.stub 2>/dev/null\n"
        "RUN --mount=type=secret,id=tok,env=TOKEN,target=/etc/tok "
        'echo "$TOKEN" && cat /etc/tok > /dev/null && echo again > /again\n',
    )
    result, events = build(path, secrets={"tok": f})
    assert logs(events, 1) == "440 1000\n****\n"
    assert logs(events, 2) == "****\n"
    assert SECRET.decode() not in json.dumps(events)
    # neither the value nor the mount points (/run/secrets/tok, /etc/tok) are in the layers
    assert added_paths(result) == {"built", "again"}
    assert SECRET not in added_bytes(result)
    assert "TOKEN" not in json.dumps(result.manifest.config)
    # the value is not in the key: a new value is a full hit
    _, again = build(path, secrets={"tok": b"another value"})
    assert executed(again) == []


def test_missing_required_secret_names_the_line(tmp_path: Path) -> None:
    path = dockerfile(
        tmp_path,
        "FROM busybox\nRUN --mount=type=secret,id=tok,required=true cat /run/secrets/tok\n",
    )
    with pytest.raises(TlimageError, match=rf"^{path}:2: secret 'tok' is required"):
        ns_build(path)


def test_bind_from_context_hides_ignored_files_and_discards_writes(tmp_path: Path, build) -> None:  # noqa: ANN001
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("alpha\n")
    (tmp_path / "src" / "sub" / "keep.txt").write_text("keep\n")
    (tmp_path / "src" / "sub" / "drop.log").write_text("drop\n")
    (tmp_path / "src" / "node_modules").mkdir()
    (tmp_path / "src" / "node_modules" / "big").write_text("x\n")
    (tmp_path / ".dockerignore").write_text("**/*.log\nsrc/node_modules\n")
    path = dockerfile(
        tmp_path,
        "FROM busybox\n"
        "RUN --mount=type=bind,source=src,target=/src "
        "cd /src && find . | sort && cat a.txt && "
        "(touch /src/new 2>/dev/null && echo writable || echo read-only)\n"
        "RUN --mount=type=bind,source=src/a.txt,target=/one.txt,rw "
        "echo changed > /one.txt && cat /one.txt && mkdir -p /o && cp /one.txt /o/\n",
    )
    result, events = build(path)
    assert logs(events, 1) == ".\n./a.txt\n./sub\n./sub/keep.txt\nalpha\nread-only\n"
    assert logs(events, 2) == "changed\n"
    assert (tmp_path / "src" / "a.txt").read_text() == "alpha\n"  # rw writes were discarded
    assert added_paths(result) == {"o", "o/one.txt"}  # no /src, no /one.txt stub


def test_bind_from_another_stage_resolves_links_inside_that_stage(
    tmp_path: Path, build, request: pytest.FixtureRequest
) -> None:  # noqa: ANN001
    vm = (request.getfixturevalue("microvm")
          if request.node.callspec.params["build"] == "microvm" else None)  # fmt: skip
    boots = vm.boots if vm is not None else 0
    marker = f"/etc/stage-only-{uuid.uuid4().hex}"
    path = dockerfile(
        tmp_path,
        "FROM busybox AS build\n"
        f"RUN echo from-the-stage > {marker} && ln -s /etc /s\n"
        "FROM busybox\n"
        f"RUN --mount=type=bind,from=build,source=/s,target=/o cat /o{marker[4:]}\n"
        "RUN --mount=type=tmpfs,target=/scratch,size=1m "
        "df -k /scratch | tail -1 | awk '{print $2}' && echo x > /scratch/x\n",
    )
    result, events = build(path)
    assert not Path(marker).exists()  # resolved inside the stage, not on this host
    assert logs(events, 1) == "from-the-stage\n"
    assert logs(events, 2) == "1024\n"
    assert added_paths(result) == set()  # neither step left anything
    if vm is not None:  # the stage's layers and tmpfs need no new disk: one VM served it all
        assert vm.boots - boots <= 1


def test_mount_errors_name_the_line(tmp_path: Path, build) -> None:  # noqa: ANN001
    (tmp_path / "d").mkdir()
    path = dockerfile(
        tmp_path, "FROM busybox\nRUN --mount=type=bind,source=d,target=/bin/sh true\n"
    )
    with pytest.raises(TlimageError, match=rf"^{path}:2: step could not start: RUN --mount: "
                       r"cannot mount bind at /bin/sh: Not a directory$"):  # fmt: skip
        build(path)


def test_nested_mount_stubs_leave_the_cache_clean(tmp_path: Path, build) -> None:  # noqa: ANN001
    path = dockerfile(tmp_path, "FROM busybox\n"
                      "RUN --mount=type=cache,id=nest,target=/c "
                      "--mount=type=secret,id=s,target=/c/deep/s "
                      "cat /c/deep/s && echo kept > /c/kept\n")  # fmt: skip
    _, events = build(path, secrets={"s": b"nested-secret-value"})
    assert logs(events) == "****"
    cache = cache_mount_dir(BlobStore().path, "nest") / "0"
    assert sorted(os.listdir(cache)) == ["kept"]


def test_cli_secret_option(tmp_path: Path) -> None:
    (tmp_path / "tok").write_bytes(SECRET)
    dockerfile(tmp_path, "FROM busybox\n"
               "RUN --mount=type=secret,id=a,required --mount=type=secret,id=b,env=B,required "
               "cat /run/secrets/a && echo && echo \"$B\"\n")  # fmt: skip
    env = {**os.environ, "FROM_ENV": "from-env-value"}
    out = subprocess.run(
        [sys.executable, "-m", "tlimage", "sbx", "image", "create", "Dockerfile", "--isolation",
         "namespace", "--json", "--secret", "id=a,src=tok", "--secret", "id=b,env=FROM_ENV"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert SECRET.decode() not in out.stdout and "from-env-value" not in out.stdout
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert logs(events) == "****\n****\n"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture
def debian_cache(shared_cache: Path) -> Path:
    if shutil.which("mmdebstrap") is None and not any(
            (shared_cache / "executor-v1" / "bases").glob("debian-minimal-*")):  # fmt: skip
        pytest.skip("debian-minimal is not built and mmdebstrap is not installed")
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable")
    return shared_cache


def test_real_pip_step_reuses_its_cache_mount(tmp_path: Path, debian_cache: Path) -> None:
    # A wheelhouse on the cache mount: the first build downloads into it, the second finds the
    # file there (pip's HTTP cache would do, but proxies that strip caching headers defeat it).
    cid = f"tlimage-test-pip-{uuid.uuid4().hex[:8]}"
    step = (
        f"RUN --mount=type=cache,id={cid},target=/root/.cache/pip "
        "pip download --no-deps -d /root/.cache/pip/wheels six==1.16.0 && "
        "pip install --no-index --no-deps --find-links /root/.cache/pip/wheels six==1.16.0 "
        "&& echo {n}\n"
    )
    path = dockerfile(tmp_path, "FROM debian-minimal\n" + step.replace("{n}", "1"))
    store = BlobStore(debian_cache)
    try:
        first, ev1 = ns_build(path, cache_dir=debian_cache, register=False)
        assert "Saved /root/.cache/pip/wheels/six-1.16.0-py2.py3-none-any.whl" in logs(ev1)
        path.write_text("FROM debian-minimal\n" + step.replace("{n}", "2"))
        second, ev2 = ns_build(path, cache_dir=debian_cache, register=False)
        assert "File was already downloaded /root/.cache/pip/wheels/six-1.16.0" in logs(ev2)
        for r in (first, second):
            paths = added_paths(r, store)
            assert not any(p.startswith("root/.cache") for p in paths), paths
            assert any(p.endswith("-packages/six.py") for p in paths), paths
    finally:
        shutil.rmtree(cache_mount_dir(store.path, cid), ignore_errors=True)


def test_step_failure_inside_a_mount_step_keeps_the_log_redacted(tmp_path: Path, build) -> None:  # noqa: ANN001
    path = dockerfile(
        tmp_path, 'FROM busybox\nRUN --mount=type=secret,id=tok,env=T echo "leak: $T" && exit 3\n'
    )
    with pytest.raises(StepFailed) as err:
        build(path, secrets={"tok": SECRET})
    assert err.value.log_tail == ("leak: ****",)
