"""The executor backends on a real busybox base: the microVM (TCG, or KVM where the probe
passes) and the namespace sandbox. Boots few VMs: one warm VM serves the step, the chained step
and the error case; one more for the time-out, one for Ctrl-C.

The guest kit (kernel + initramfs) and the busybox base are provisioned once per session into a
shared cache folder (TLIMAGE_EXECUTOR_TEST_CACHE, default ~/.cache/tlimage), so reruns on the
same machine skip the apt download."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.netcheck import check_probe, host_servers, probe_script
from tlimage.errors import ExecutorError
from tlimage.executor.base import RunRequest, StepTimeout

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="both backends need root"),
]

STEP = ("/bin/sh", "-c", "echo hi; mkdir /x; rm /etc/some-file; echo warn >&2; exit 3")


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    env = os.environ.get("TLIMAGE_EXECUTOR_TEST_CACHE")
    if env:
        return Path(env)
    from tlimage.cache.store import default_cache_root

    # Session fixtures are set up before conftest's per-test cache folder: this is the user's.
    return default_cache_root()


@pytest.fixture(scope="session")
def base(shared_cache, tmp_path_factory) -> Path:
    """The busybox base (the tests add /etc/some-file as a second lower, `extra_layer`)."""
    from tlimage.executor.bases import ensure_base

    if shutil.which("busybox") is None:
        pytest.skip("busybox-static is not installed (scripts/setup.sh installs it)")
    return ensure_base("busybox", shared_cache).tree


@pytest.fixture(scope="session")
def extra_layer(tmp_path_factory) -> Path:
    layer = tmp_path_factory.mktemp("layer") / "l"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "some-file").write_text("remove me\n")
    (layer / "data").mkdir()
    (layer / "data" / "old").write_text("old\n")
    return layer


@pytest.fixture(scope="session")
def microvm(shared_cache):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed (scripts/setup.sh installs it)")
    from tlimage.executor.microvm import MicroVMExecutor

    ex = MicroVMExecutor(cache_dir=shared_cache)
    yield ex
    ex.close()


@pytest.fixture(scope="session")
def namespace():
    from tlimage.executor.namespace import NamespaceExecutor

    return NamespaceExecutor()


def snapshot(root: Path) -> dict[str, tuple]:
    """Content of an overlay-style upper, without times."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode):
                extra = st.st_rdev
            elif stat.S_ISDIR(st.st_mode):
                names = os.listxattr(p, follow_symlinks=False)
                extra = "opaque" if "trusted.overlay.opaque" in names else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return out


def run(ex, lowers, argv, upper, **kw):
    chunks: list[tuple[str, bytes]] = []
    r = ex.run(
        RunRequest(lowers=tuple(lowers), argv=argv, upper_dir=upper, **kw),
        lambda s, b: chunks.append((s, b)),
    )
    out = b"".join(b for s, b in chunks if s == "stdout")
    err = b"".join(b for s, b in chunks if s == "stderr")
    return r, out, err


def qemu_pids() -> set[int]:
    p = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64 -M microvm"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {int(x) for x in p.stdout.split()}


def check_step_upper(upper: Path) -> None:
    assert (upper / "x").is_dir()
    st = os.lstat(upper / "etc" / "some-file")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # whiteout
    assert sorted(os.listdir(upper)) == ["etc", "x"]
    assert os.listdir(upper / "etc") == ["some-file"]


def test_step_on_both_backends_gives_the_same_upper(
    microvm, namespace, base, extra_layer, tmp_path
):
    lowers = (base, extra_layer)
    r_vm, out_vm, err_vm = run(microvm, lowers, STEP, tmp_path / "vm")
    r_ns, out_ns, err_ns = run(namespace, lowers, STEP, tmp_path / "ns")
    for r, out, err in ((r_vm, out_vm, err_vm), (r_ns, out_ns, err_ns)):
        assert (r.exit_code, out, err) == (3, b"hi\n", b"warn\n")
        check_step_upper(r.upper)
    assert snapshot(r_vm.upper) == snapshot(r_ns.upper)

    # Chained step on the previous upper (a copy at another path, as the layer store gives it):
    # the warm VM serves it without a boot; an opaque dir must come out on both backends.
    boots = microvm.boots
    chain = ("/bin/sh", "-c", "rm -r /data && mkdir /data && echo new > /data/f && ls /etc")
    prev_copy = tmp_path / "prev"
    subprocess.run(["cp", "-a", str(r_vm.upper), str(prev_copy)], check=True)
    r2_vm, out2_vm, _ = run(microvm, (*lowers, prev_copy), chain, tmp_path / "vm2")
    r2_ns, out2_ns, _ = run(namespace, (*lowers, r_ns.upper), chain, tmp_path / "ns2")
    assert microvm.boots == boots
    assert r2_vm.exit_code == r2_ns.exit_code == 0
    assert b"some-file" not in out2_vm and out2_vm == out2_ns
    assert r2_vm.opaque == r2_ns.opaque == ("data",)
    assert snapshot(r2_vm.upper) == snapshot(r2_ns.upper)
    assert snapshot(r2_vm.upper)["data"][4] == "opaque"


def test_a_namespace_step_runs_under_umask_022_whatever_the_callers(namespace, base, tmp_path):
    """As runc gives a container's process: a step's files must not depend on the umask of
    whoever ran the build (layers would differ between machines)."""
    old = os.umask(0o077)
    try:
        r, out, err = run(namespace, (base,), ("/bin/sh", "-c", "umask; mkdir /made; echo x > "
                                              "/made/f"), tmp_path / "u")  # fmt: skip
    finally:
        os.umask(old)
    assert (r.exit_code, out) == (0, b"0022\n"), err
    assert stat.S_IMODE(os.lstat(r.upper / "made").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(r.upper / "made/f").st_mode) == 0o644


def test_setup_errors_are_executor_errors(microvm, namespace, base, tmp_path):
    for ex in (namespace, microvm):
        with pytest.raises(ExecutorError, match="unable to find user nobody-here"):
            run(ex, (base,), ("true",), tmp_path / f"{ex.name}-u", user="nobody-here")
        assert not (tmp_path / f"{ex.name}-u").exists()
        with pytest.raises(ExecutorError, match="executable file not found"):
            run(ex, (base,), ("no-such-cmd",), tmp_path / f"{ex.name}-c")


def test_users_and_workdir_agree(microvm, namespace, base, tmp_path):
    argv = ("/bin/sh", "-c", 'echo "$(id -u):$(id -g):$(pwd):$HOME"; touch /tmp/t')
    outs = []
    for ex in (namespace, microvm):
        r, out, _ = run(ex, (base,), argv, tmp_path / ex.name, user="nobody", workdir="/tmp")
        assert r.exit_code == 0
        outs.append(out)
        assert os.lstat(r.upper / "tmp" / "t").st_uid == 65534
    assert outs[0] == outs[1] == b"65534:65534:/tmp:/nonexistent\n"


def test_timeouts_kill_everything(microvm, namespace, base, tmp_path):
    before = qemu_pids()
    for ex in (namespace, microvm):
        t0 = time.monotonic()
        with pytest.raises(StepTimeout, match="timed out after 1 s"):
            run(
                ex,
                (base,),
                ("/bin/sh", "-c", "echo start; sleep 600"),
                tmp_path / ex.name,
                timeout=1,
            )
        assert time.monotonic() - t0 < 60
        assert not (tmp_path / ex.name).exists()
    assert not (qemu_pids() - before), "the timed-out VM is still running"
    assert subprocess.run(["pgrep", "-f", "sleep 600"], check=False).returncode == 1


def test_interrupt_reaps_the_vm(microvm, base, tmp_path):
    before = qemu_pids()
    tmp_before = set(Path("/tmp").glob("tl-vm-*"))

    def interrupt(stream: str, data: bytes) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        microvm.run(
            RunRequest(
                lowers=(base,),
                argv=("/bin/sh", "-c", "echo x; sleep 600"),
                upper_dir=tmp_path / "u",
            ),
            interrupt,
        )
    assert not (qemu_pids() - before)
    assert not (tmp_path / "u").exists()
    assert set(Path("/tmp").glob("tl-vm-*")) <= tmp_before  # the VM's temp folder is gone


def test_a_step_with_network_reaches_out_but_not_the_host(microvm, base, tmp_path):
    """QEMU's user-mode network would take the guest to the host's 127.0.0.1 (as 10.0.2.2) and
    to every address of the host; the step's VM runs in a network namespace of its own whose
    only way out (slirp4netns + nft, sandbox/network.py) refuses both."""
    with host_servers() as (lo_port, me, my_port):
        r, out, err = run(microvm, (base,), ("/bin/sh", "-c", probe_script(lo_port, me, my_port)),
                          tmp_path / "u", network=True)  # fmt: skip
    assert r.exit_code == 0, err
    check_probe(out.decode(), lo_port, me, my_port)
