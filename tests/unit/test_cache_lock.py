import os
import subprocess
import sys
import textwrap
import time

import pytest

from tlimage.cache.lock import CacheLock, LockTimeout

HOLD = textwrap.dedent(
    """
    import sys, time
    from tlimage.cache.lock import CacheLock
    lock = CacheLock(sys.argv[1])
    ctx = lock.exclusive(purpose=sys.argv[2]) if sys.argv[3] == "ex" else lock.shared(purpose=sys.argv[2])
    with ctx:
        print("held", flush=True)
        time.sleep(float(sys.argv[4]))
    """
)


def hold(path, purpose, mode, seconds):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), purpose, mode, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_shared_holders_coexist(tmp_path):
    lock = CacheLock(tmp_path / "lock")
    with lock.shared(on_wait=None), lock.shared(on_wait=None):
        assert {h.mode for h in lock.holders()} == {"shared"}
        assert len(lock.holders()) == 2
    assert lock.holders() == []


def test_exclusive_waits_says_why_and_times_out(tmp_path):
    path = tmp_path / "lock"
    p = hold(path, "build of app", "sh", 30)
    try:
        lock = CacheLock(path)
        said = []
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as e:
            with lock.exclusive(timeout=0.3, on_wait=said.append):
                pass
        assert time.monotonic() - t0 >= 0.3
        assert len(said) == 1
        assert f"pid {p.pid} (build of app, shared" in said[0]
        assert "timed out after 0.3s waiting for the exclusive cache lock" in str(e.value)
        assert f"pid {p.pid}" in str(e.value)
        # a shared request is not blocked by a shared holder
        with lock.shared(timeout=0.3, on_wait=None):
            pass
    finally:
        p.kill()
        p.wait()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    path = tmp_path / "lock"
    p = hold(path, "prune", "ex", 60)
    lock = CacheLock(path)
    with pytest.raises(LockTimeout, match=r"prune, exclusive"):
        with lock.shared(timeout=0.1, on_wait=None):
            pass
    p.kill()
    p.wait()
    with lock.exclusive(timeout=5, on_wait=None):
        assert [h.pid for h in lock.holders()] == [os.getpid()]
    # the dead holder's note was swept
    assert os.listdir(lock.holders_dir) == []


def test_waiter_gets_the_lock_when_it_is_released(tmp_path):
    path = tmp_path / "lock"
    p = hold(path, "prune", "ex", 0.5)
    lock = CacheLock(path)
    said = []
    with lock.shared(timeout=10, on_wait=said.append):
        pass
    assert said and "prune" in said[0]
    p.wait()
