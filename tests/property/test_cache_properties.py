"""Properties of the cache's digests and layers over generated trees."""

import os
import random
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlimage.cache.filehash import digest_tree
from tlimage.cache.layer import apply_layer, layer_from_dir, layer_from_upper
from tlimage.cache.store import BlobStore
from tlimage.cache.testing import Entry, make_tree, snapshot_tree

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(alphabet=st.sampled_from("ab-_.Z\u00e9 \u2603"), min_size=1, max_size=4).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh.")
)
file_mode = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o4755, 0o444])
dir_mode = st.sampled_from([0o755, 0o700, 0o750, 0o555])
leaf = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=2000), file_mode),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../x", "/abs/path", "b/c", ""])).filter(
        lambda t: t[1] != ""
    ),
)
tree_node = st.recursive(
    leaf,
    lambda children: st.tuples(
        st.just("dir"), st.dictionaries(names, children, max_size=4), dir_mode
    ),
    max_leaves=12,
)
trees = st.dictionaries(names, tree_node, max_size=6)


def flatten(tree, prefix=""):
    """Entry list (parents before children) for a generated tree."""
    out = []
    for name, node in tree.items():
        path = f"{prefix}{name}"
        if node[0] == "file":
            out.append(Entry("file", path, node[1], mode=node[2]))
        elif node[0] == "symlink":
            out.append(Entry("symlink", path, target=node[1]))
        else:
            out.append(Entry("dir", path, mode=node[2]))
            out.extend(flatten(node[1], path + "/"))
    return out


@st.composite
def specs(draw):
    entries = flatten(draw(trees))
    files = [e for e in entries if e.kind == "file"]
    if files and draw(st.booleans()):
        target = draw(st.sampled_from(files))
        parent = target.path.rpartition("/")[0]
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if all(e.path != path and not e.path.startswith(path + "/") for e in entries):
            entries.append(Entry("hardlink", path, target=target.path))
    seed = draw(st.integers(0, 2**32 - 1))
    return entries, seed


def materialize(root, entries, seed):
    """Create the tree in a seed-dependent order, umask and mtime; the content is the same."""
    rng = random.Random(seed)
    dirs = [e for e in entries if e.kind == "dir"]
    others = [e for e in entries if e.kind not in ("dir", "hardlink")]
    links = [e for e in entries if e.kind == "hardlink"]
    rng.shuffle(dirs)
    rng.shuffle(others)
    old = os.umask(rng.choice([0o022, 0o077, 0o002, 0o000]))
    try:
        make_tree(root, dirs + others + links, mtime=rng.randrange(0, 2**40))
    finally:
        os.umask(old)


@SETTINGS
@given(specs())
def test_layer_bytes_depend_only_on_the_tree(spec):
    entries, seed = spec
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(os.path.join(tmp, "cache"))
        materialize(os.path.join(tmp, "one"), entries, seed)
        materialize(os.path.join(tmp, "two"), entries, seed + 1)
        a = layer_from_dir(os.path.join(tmp, "one"), store)
        b = layer_from_dir(os.path.join(tmp, "two"), store)
        assert a == b


@SETTINGS
@given(specs())
def test_apply_of_layer_reproduces_the_tree(spec):
    entries, seed = spec
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(os.path.join(tmp, "cache"))
        src, dest = os.path.join(tmp, "src"), os.path.join(tmp, "dest")
        materialize(src, entries, seed)
        info = layer_from_dir(src, store)
        with store.open(info.digest, verify=True) as f:
            stats = apply_layer(f, dest)
        assert stats.skipped == []
        assert snapshot_tree(dest) == snapshot_tree(src)


@SETTINGS
@given(specs(), st.data())
def test_tree_digest_ignores_order_mtime_umask_and_sees_content(spec, data):
    entries, seed = spec
    with tempfile.TemporaryDirectory() as tmp:
        one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
        materialize(one, entries, seed)
        materialize(two, entries, seed + 1)
        base = digest_tree(one)
        assert digest_tree(two).digest == base.digest
        files = [e for e in entries if e.kind == "file"]
        if files:
            victim = data.draw(st.sampled_from(files))
            with open(os.path.join(two, victim.path), "ab") as f:
                f.write(b"!")
            assert digest_tree(two).digest != base.digest


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts need mknod and trusted xattrs (root)")
@SETTINGS
@given(specs(), st.data())
def test_upper_layer_applies_overlay_semantics(spec, data):
    """lower + layer(upper) == the model of the merged view."""
    entries, seed = spec
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(os.path.join(tmp, "cache"))
        lower, upper, dest = (os.path.join(tmp, n) for n in ("lower", "upper", "dest"))
        materialize(lower, entries, seed)
        os.makedirs(upper)
        expected = snapshot_tree(lower)
        top = sorted({e.path.split("/")[0] for e in entries})
        gone = data.draw(st.lists(st.sampled_from(top), unique=True)) if top else []
        dirs = [p for p in top if p not in gone and expected[p][0] == "dir"]
        opaque = data.draw(st.lists(st.sampled_from(dirs), unique=True)) if dirs else []
        new_name = "new\u00e9"
        upper_entries = [Entry("whiteout", p) for p in gone]
        upper_entries += [Entry("opaque", p) for p in opaque]
        upper_entries += [Entry("file", f"{p}/{new_name}", b"fresh") for p in opaque]
        upper_entries.append(Entry("file", new_name, b"top"))
        make_tree(upper, upper_entries)
        for p in opaque:  # the opaque dir keeps the lower dir's mode/owner, as after copy-up
            os.chmod(os.path.join(upper, p), expected[p][1])
        apply_layer(store.blob_path(layer_from_dir(lower, store).digest), dest)
        apply_layer(store.blob_path(layer_from_upper(upper, store).digest), dest)

        def under(path, roots):
            return any(path == r or path.startswith(r + "/") for r in roots)

        # whiteouts remove the entry and its subtree; an opaque dir keeps itself, not its children
        model = {p: v for p, v in expected.items() if p in opaque or not under(p, gone + opaque)}
        got = snapshot_tree(dest)
        for p in opaque:
            model[f"{p}/{new_name}"] = got.get(f"{p}/{new_name}")
        model[new_name] = got.get(new_name)
        # hard-link groups whose other members were removed are singletons now
        strip = lambda snap: {p: v[:5] + v[6:] for p, v in snap.items()}  # noqa: E731
        assert strip(got) == strip(model)
        assert got[new_name][4] and all(got[f"{p}/{new_name}"][4] for p in opaque)


GOLDEN_TREE = [
    Entry("file", "a.txt", b"alpha\n"),
    Entry("file", "bin/run", b"#!/bin/sh\necho hi\n", mode=0o755),
    Entry("symlink", "bin/latest", target="run"),
    Entry("dir", "empty"),
]


def test_tree_digest_format_is_pinned(tmp_path):
    """A change of this value changes every COPY key: bump TREE_FORMAT when it is intended."""
    make_tree(tmp_path, GOLDEN_TREE)
    assert digest_tree(tmp_path).digest == GOLDEN_DIGEST


GOLDEN_DIGEST = "xxh3:76269e410fb5dd5edfeff38e6c7803e7"


def test_digest_is_stable_across_processes(tmp_path):
    make_tree(tmp_path / "t", GOLDEN_TREE + [Entry("file", "big", bytes(range(256)) * 9000)])
    code = textwrap.dedent(
        """
        import sys
        from tlimage.cache.filehash import digest_tree
        print(digest_tree(sys.argv[1]).digest)
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "t")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert outs == {digest_tree(tmp_path / "t").digest}
