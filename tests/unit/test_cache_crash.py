"""Real processes against one cache: SIGKILL at random and at chosen points, and 8 concurrent
writers. Afterwards every index row must name a complete blob that verifies and applies."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tlimage.cache.cache import LayerCache

pytestmark = pytest.mark.slow

# A writer that stores layers forever (until killed): fresh keys, keys shared with other writers
# (replacing each other's rows), an occasional prune, and big enough files that a kill often
# lands mid-write.
WRITER = textwrap.dedent(
    """
    import os, random, sys, tempfile
    from tlimage.cache.cache import LayerCache
    from tlimage.cache.testing import Entry, make_tree

    root, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    cache = LayerCache(root, on_wait=None)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        with tempfile.TemporaryDirectory() as tmp:
            n = rng.randint(1, 6)
            make_tree(tmp, [Entry("file", f"d{j % 2}/f{j}", rng.randbytes(rng.randint(0, 400_000)))
                            for j in range(n)])
            if rng.random() < 0.1:
                cache.prune(keep_storage=rng.randint(0, 3_000_000))
                continue
            key = f"shared-{rng.randint(0, 4)}" if rng.random() < 0.5 else f"k-{seed}-{i}"
            with cache.session():
                cache.store_dir(key, tmp, description=f"writer {seed} #{i}")
                with open(root + ".progress", "a") as log:
                    log.write(key + "\\n")
                rec = cache.lookup(key)
                if rec is not None:
                    cache.apply(rec, os.path.join(tmp, "out"))
    """
)


def check_integrity(root, tmp_path):
    """Every row names a blob that verifies and applies; returns the LayerCache."""
    cache = LayerCache(root, on_wait=None)
    for n, entry in enumerate(cache.ls()):
        assert cache.store.size(entry.digest) == entry.size, entry
        assert cache.store.verify(entry.digest), entry
        rec = cache.lookup(entry.key, verify=True)
        assert rec is not None
        cache.apply(rec, tmp_path / f"apply{n}")
    return cache


def test_sigkill_at_random_points_leaves_no_corrupt_entry(tmp_path):
    root = tmp_path / "cache"
    rng = random.Random(1234)
    progress = tmp_path / "cache.progress"
    # The kill lands a random time after the writers are ready (not after they were started: a
    # loaded host can take longer than the whole window to start Python), and rounds go on until
    # enough layers were stored for the check to mean something.
    for round_ in range(200):
        if round_ >= 24 and progress.exists() and len(progress.read_text().split()) >= 10:
            break
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(root), str(round_ * 10 + k)],
                stdout=subprocess.PIPE,
            )
            for k in range(2)
        ]
        for p in procs:
            assert p.stdout.readline() == b"ready\n", "a writer did not start"
        time.sleep(rng.uniform(0.15, 0.9))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            assert p.wait() == -signal.SIGKILL, "a writer exited on its own (crashed?)"
            p.stdout.close()
    cache = check_integrity(root, tmp_path)
    stored = (tmp_path / "cache.progress").read_text().split()
    assert len(stored) >= 10, "writers got too few layers stored; the test proved little"
    # Debris a crash may leave: temp files (dead pids) and unindexed blobs. Both are swept.
    with cache.session():
        pass  # sweeps temp files of dead writers
    assert not [n for n in os.listdir(cache.store.blobs_dir) if n.startswith(".tmp-")]
    before = len(cache.ls())
    result = cache.prune(keep_storage=10**12)
    assert result.removed_entries == 0 and len(cache.ls()) == before
    assert set(cache.store.iter_digests()) == cache.index.digests()


CRASH_AT = textwrap.dedent(
    """
    import os, signal, sys, tempfile
    from tlimage.cache.cache import LayerCache
    from tlimage.cache.testing import Entry, make_tree

    root, point = sys.argv[1], sys.argv[2]
    cache = LayerCache(root, on_wait=None)
    real_replace, real_fsync = os.replace, os.fsync

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst, *a, **k):
        if "/blobs/" in str(dst) and point == "before-rename":
            die()
        real_replace(src, dst, *a, **k)
        if "/blobs/" in str(dst) and point == "after-rename":
            die()

    def fsync(fd):
        if point == "before-fsync":
            die()
        real_fsync(fd)

    os.replace, os.fsync = replace, fsync
    with tempfile.TemporaryDirectory() as tmp:
        make_tree(tmp, [Entry("file", "f", os.urandom(100_000))])
        with cache.session():
            cache.store_dir("the-key", tmp)
    print("survived")
    """
)


@pytest.mark.parametrize("point", ["before-fsync", "before-rename", "after-rename"])
def test_sigkill_at_each_step_of_a_write(tmp_path, point):
    root = tmp_path / "cache"
    p = subprocess.run(
        [sys.executable, "-c", CRASH_AT, str(root), point], capture_output=True, text=True
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    cache = LayerCache(root, on_wait=None)
    assert cache.lookup("the-key") is None  # the row is never written before the blob is in place
    debris = os.listdir(cache.store.blobs_dir)
    if point == "after-rename":
        assert len(list(cache.store.iter_digests())) == 1  # an unindexed blob
    else:
        assert [n for n in debris if n.startswith(".tmp-")]
    with cache.session():
        pass
    result = cache.prune(keep_storage=10**12)
    assert os.listdir(cache.store.blobs_dir) == []
    assert result.swept_orphan_blobs == (1 if point == "after-rename" else 0)


CONCURRENT = textwrap.dedent(
    """
    import json, os, random, sys, tempfile
    from tlimage.cache.cache import LayerCache
    from tlimage.cache.testing import Entry, make_tree

    root, worker = sys.argv[1], int(sys.argv[2])
    os.umask([0o022, 0o077, 0o002, 0o027][worker % 4])
    specs = []
    for layer in range(6):
        rng = random.Random(layer)  # the same trees in every worker
        specs.append([Entry("file", f"l{layer}/d{j % 3}/f{j}", rng.randbytes(rng.randint(0, 300_000)),
                            mode=0o644 if j % 2 else 0o755) for j in range(8)])
    order = list(range(6))
    random.Random(worker).shuffle(order)  # different order of work per worker
    out = {}
    cache = LayerCache(root, on_wait=None)
    with cache.session(purpose=f"worker {worker}"):
        for layer in order:
            entries = specs[layer][:]
            random.Random(worker * 100 + layer).shuffle(entries)  # different creation order
            with tempfile.TemporaryDirectory() as tmp:
                make_tree(tmp, entries, mtime=worker * 10**9)
                rec = cache.lookup(f"layer-{layer}")
                if rec is None:
                    rec = cache.store_dir(f"layer-{layer}", tmp, description=f"layer {layer}")
                out[layer] = [rec.digest, rec.diff_id]
    print(json.dumps(out, sort_keys=True))
    """
)


def test_eight_concurrent_writers_agree(tmp_path):
    root = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(root), str(w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(8)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert all(r == results[0] for r in results), results
    cache = check_integrity(root, tmp_path)
    assert sorted(e.key for e in cache.ls()) == [f"layer-{i}" for i in range(6)]
    assert set(cache.store.iter_digests()) == {d for d, _ in results[0].values()}
    assert not [n for n in os.listdir(cache.store.blobs_dir) if n.startswith(".")]
