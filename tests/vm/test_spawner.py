"""The spawner (sandbox/spawner.py, _spawn.py) that forks every build step's and sandbox's
launcher: concurrent launches keep their own descriptors, a failure before the sandbox's own
code is an error that says why, a dead spawner is replaced, and the caller's death ends the
spawner and every step it runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tlimage.executor.base import RunRequest
from tlimage.sandbox import spawner

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace sandboxes need root"),
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base() -> Path:
    from tlimage.executor.bases import ensure_base

    return ensure_base("busybox").tree


def _step(tmp_path: Path, base: Path, script: str, i: int) -> tuple[int, bytes]:
    from tlimage.executor.namespace import NamespaceExecutor

    out: list[bytes] = []
    upper = tmp_path / f"upper{i}"
    r = NamespaceExecutor().run(RunRequest(lowers=(base,), argv=("/bin/sh", "-c", script),
                                           upper_dir=upper), lambda _s, b: out.append(b))  # fmt: skip
    shutil.rmtree(upper, ignore_errors=True)
    return r.exit_code, b"".join(out)


def test_concurrent_steps_each_get_their_own_output_and_code(tmp_path: Path, base: Path) -> None:
    def one(i: int) -> tuple[int, bytes]:
        return _step(tmp_path, base, f"echo out-{i}; echo err-{i} >&2; exit {i}", i)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    for i, (code, out) in enumerate(results):
        assert code == i
        assert sorted(out.split()) == [f"err-{i}".encode(), f"out-{i}".encode()]


def test_a_failure_before_the_sandbox_code_says_why() -> None:
    proc = spawner.launch("_init", b"{}", cgroup_procs=["/nonexistent/tl-cgroup.procs"])
    assert proc.wait(30) == 127
    assert "/nonexistent/tl-cgroup.procs" in proc.error


def test_a_dead_spawner_is_started_again(tmp_path: Path, base: Path) -> None:
    assert _step(tmp_path, base, "echo one", 0) == (0, b"one\n")
    first = spawner._current  # noqa: SLF001 - the helper this process started
    assert first is not None
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert _step(tmp_path, base, "echo two", 1) == (0, b"two\n")
    assert spawner._current is not None and spawner._current.proc.pid != first.proc.pid  # noqa: SLF001


CALLER = """
import sys
from pathlib import Path
from tlimage.executor.base import RunRequest
from tlimage.executor.namespace import NamespaceExecutor
from tlimage.sandbox import spawner

def out(_s, b):
    sys.stdout.write(f"{spawner._current.proc.pid} {b.decode()}")
    sys.stdout.flush()

NamespaceExecutor().run(RunRequest(lowers=(Path(sys.argv[1]),),
    argv=("/bin/sh", "-c", "echo started; exec sleep 3137"), upper_dir=Path(sys.argv[2])), out)
"""


def _sleepers() -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/cmdline").read_bytes() == b"sleep\x003137\x00":
                    found.append(int(d))
            except OSError:
                pass
    return found


def test_the_callers_death_ends_the_spawner_and_its_steps(tmp_path: Path, base: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(base), str(tmp_path / "up")],
                              stdout=subprocess.PIPE, env=env)  # fmt: skip
    try:
        assert caller.stdout is not None
        line = caller.stdout.readline().decode()
        assert line.endswith(" started\n"), line
        helper = int(line.split()[0])
        deadline = time.monotonic() + 10  # `exec sleep` follows the echo
        while not _sleepers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _sleepers()
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_sleepers() or os.path.exists(f"/proc/{helper}")):
        time.sleep(0.05)
    assert not _sleepers(), "the step outlived its caller"
    assert not os.path.exists(f"/proc/{helper}"), "the spawner outlived its caller"


BACKGROUND_CALLER = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job (`cmd &`, nohup)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
from tlimage.executor.base import RunRequest
from tlimage.executor.namespace import NamespaceExecutor
out = []
r = NamespaceExecutor().run(RunRequest(lowers=(Path(sys.argv[1]),),
    argv=("/bin/cat", "/proc/self/status"), upper_dir=Path(sys.argv[2])),
    lambda _s, b: out.append(b))
sys.stdout.write(b"".join(out).decode())
"""


def test_a_step_starts_with_default_signals_whatever_its_caller_ignores(tmp_path: Path,
                                                                         base: Path) -> None:  # fmt: skip
    """A build run in the background (SIGINT and SIGQUIT ignored) must not hand that to its
    steps: an ignored signal survives exec, and `kill -INT` or Ctrl-C would do nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    status = subprocess.run([sys.executable, "-c", BACKGROUND_CALLER, str(base),
                             str(tmp_path / "up")], capture_output=True, text=True, env=env,
                            timeout=120).stdout  # fmt: skip
    assert "SigIgn:\t0000000000000000" in status, status
    assert "SigBlk:\t0000000000000000" in status, status
