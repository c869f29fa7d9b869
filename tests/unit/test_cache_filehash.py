import os
import time

import pytest
import xxhash

from tlimage.cache.filehash import (
    ContextPathError,
    FileHasher,
    diff_manifests,
    digest_tree,
    hash_file,
)
from tlimage.cache.ignore import BadPattern, IgnoreMatcher
from tlimage.cache.testing import Entry, make_tree


@pytest.fixture
def ctx(tmp_path):
    root = tmp_path / "ctx"
    make_tree(
        root,
        [
            Entry("file", "app/main.py", b"print('hi')\n"),
            Entry("file", "app/run.sh", b"#!/bin/sh\n", mode=0o755),
            Entry("file", "app/data/big.bin", os.urandom(3 << 20)),
            Entry("symlink", "app/link", target="main.py"),
            Entry("file", "docs/README.md", b"docs"),
            Entry("file", "docs/secret.md", b"s"),
            Entry("file", "a.txt", b"a"),
            Entry("file", "b.txt", b"b"),
            Entry("dir", "empty"),
            Entry("file", "node_modules/x/index.js", b"x"),
        ],
        mtime=10**18,
    )
    return root


def test_hash_file_is_xxh3_128(tmp_path):
    for size in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5 << 20):
        p = tmp_path / f"f{size}"
        data = os.urandom(size)
        p.write_bytes(data)
        assert hash_file(p) == xxhash.xxh3_128_hexdigest(data)


def test_covers_content_path_type_exec_and_link_target(ctx):
    base = digest_tree(ctx, ["app"]).digest
    (ctx / "app/main.py").write_bytes(b"print('bye')\n")
    changed = digest_tree(ctx, ["app"]).digest
    assert changed != base
    os.chmod(ctx / "app/main.py", 0o744)
    assert digest_tree(ctx, ["app"]).digest != changed
    os.chmod(ctx / "app/main.py", 0o754)  # other x bits: still "executable"
    exec_digest = digest_tree(ctx, ["app"]).digest
    os.chmod(ctx / "app/main.py", 0o700)
    assert digest_tree(ctx, ["app"]).digest == exec_digest
    os.unlink(ctx / "app/link")
    os.symlink("run.sh", ctx / "app/link")
    assert digest_tree(ctx, ["app"]).digest != exec_digest
    before = digest_tree(ctx, ["app"]).digest
    os.rename(ctx / "app/run.sh", ctx / "app/run2.sh")
    assert digest_tree(ctx, ["app"]).digest != before


def test_ignores_mtime_owner_and_non_exec_mode_bits(ctx):
    base = digest_tree(ctx).digest
    os.utime(ctx / "a.txt", (1, 1))
    os.chmod(ctx / "a.txt", 0o600)
    os.chmod(ctx / "app", 0o700)
    if os.geteuid() == 0:
        os.chown(ctx / "b.txt", 1234, 5678)
    assert digest_tree(ctx).digest == base


def test_file_versus_symlink_versus_dir_differ(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_tree(a, [Entry("file", "x", b"t")])
    make_tree(b, [Entry("symlink", "x", target="t")])
    make_tree(c, [Entry("dir", "x")])
    assert len({digest_tree(d).digest for d in (a, b, c)}) == 3


def test_only_selected_files_are_read(ctx, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, *a, **k):
        opened.append(os.fsdecode(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    d = digest_tree(ctx, ["*.txt"])
    assert sorted(os.path.relpath(p, ctx) for p in opened) == ["a.txt", "b.txt"]
    assert [e.path for e in d.entries] == ["a.txt", "b.txt"]


def test_wildcards_follow_filepath_match(ctx):
    assert [e.path for e in digest_tree(ctx, ["?.txt"]).entries] == ["a.txt", "b.txt"]
    assert [e.path for e in digest_tree(ctx, ["[a].txt"]).entries] == ["a.txt"]
    sel = digest_tree(ctx, ["*/*.md"]).entries
    assert [e.path for e in sel] == ["docs/README.md", "docs/secret.md"]
    # "**" is two "*" for COPY (filepath.Match), not "any depth"
    with pytest.raises(ContextPathError, match="no files"):
        digest_tree(ctx, ["**/index.js"])
    assert digest_tree(ctx, ["*.nope"], allow_empty=True).entries == ()
    with pytest.raises(BadPattern):
        digest_tree(ctx, ["[.txt"])


def test_directory_source_brings_subtree_and_empty_dirs(ctx):
    d = digest_tree(ctx, ["app", "empty"])
    assert [e.path for e in d.entries] == [
        "app",
        "app/data",
        "app/data/big.bin",
        "app/link",
        "app/main.py",
        "app/run.sh",
        "empty",
    ]
    by = {e.path: e for e in d.entries}
    assert by["app/run.sh"].executable and not by["app/main.py"].executable
    assert by["app/link"].kind == "l" and by["app/link"].payload == "main.py"


def test_missing_and_escaping_sources(ctx):
    with pytest.raises(ContextPathError, match="not found"):
        digest_tree(ctx, ["nope.txt"])
    with pytest.raises(ContextPathError, match="not found"):
        digest_tree(ctx, ["a.txt/inside"])
    with pytest.raises(ContextPathError, match="outside the build context"):
        digest_tree(ctx, ["../x"])
    # a leading "/" is the context root
    assert digest_tree(ctx, ["/a.txt"]).digest == digest_tree(ctx, ["a.txt"]).digest


def test_symlinked_source_is_followed_inside_the_context(ctx, tmp_path):
    os.symlink("app", ctx / "applink")
    os.symlink("/app/main.py", ctx / "abslink")  # absolute: the context is the root
    d = digest_tree(ctx, ["applink", "abslink"])
    by = {e.path: e for e in d.entries}
    assert by["applink"].kind == "d" and "applink/main.py" in by
    assert by["abslink"].kind == "f"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    os.symlink(outside, ctx / "escape")
    with pytest.raises(ContextPathError, match="not found"):
        digest_tree(ctx, ["escape"])


def test_dockerignore_rules_apply(ctx):
    ign = IgnoreMatcher(["node_modules", "docs", "!docs/README.md", "*.txt", "!b.txt"])
    d = digest_tree(ctx, ["."], ign)
    paths = [e.path for e in d.entries]
    assert "node_modules" not in paths and "node_modules/x/index.js" not in paths
    assert "docs" in paths and "docs/README.md" in paths and "docs/secret.md" not in paths
    assert "a.txt" not in paths and "b.txt" in paths
    with pytest.raises(ContextPathError, match="excluded") as e:
        digest_tree(ctx, ["a.txt"], ign)
    assert ".dockerignore" in e.value.render()
    with pytest.raises(ContextPathError, match="no files"):
        digest_tree(ctx, ["a.*"], ign)
    # an excluded dir with an exception inside still exists for COPY
    assert [e.path for e in digest_tree(ctx, ["docs"], ign).entries] == ["docs", "docs/README.md"]
    # ignoring a file changes nothing about a selection that does not include it
    assert digest_tree(ctx, ["app"], ign).digest == digest_tree(ctx, ["app"]).digest


def test_overlapping_sources_count_once(ctx):
    assert digest_tree(ctx, ["app", "app/main.py"]).digest == digest_tree(ctx, ["app"]).digest


def test_stat_cache_serves_unchanged_files(ctx, tmp_path):
    db = tmp_path / "stat.db"
    with FileHasher(db, racy_window_ns=0) as h:
        cold = digest_tree(ctx, hasher=h)
    assert cold.files_hashed == 8 and cold.files_cached == 0
    with FileHasher(db, racy_window_ns=0) as h:  # a new process would start like this
        warm = digest_tree(ctx, hasher=h)
    assert warm.digest == cold.digest
    assert warm.files_hashed == 0 and warm.files_cached == 8 and warm.bytes_hashed == 0
    # touch changes mtime/ctime: the file is read again, and the digest does not change
    os.utime(ctx / "a.txt")
    with FileHasher(db, racy_window_ns=0) as h:
        touched = digest_tree(ctx, hasher=h)
    assert touched.digest == cold.digest and touched.files_hashed == 1
    # same size, content rewritten: caught by mtime/ctime
    (ctx / "b.txt").write_bytes(b"B")
    with FileHasher(db, racy_window_ns=0) as h:
        changed = digest_tree(ctx, hasher=h)
    assert changed.digest != cold.digest and changed.files_hashed == 1


def test_racy_files_are_not_cached(ctx, tmp_path):
    db = tmp_path / "stat.db"
    (ctx / "fresh.txt").write_bytes(b"just written")
    with FileHasher(db, racy_window_ns=3_600 * 10**9) as h:
        digest_tree(ctx, ["fresh.txt"], hasher=h)
    with FileHasher(db, racy_window_ns=3_600 * 10**9) as h:
        again = digest_tree(ctx, ["fresh.txt"], hasher=h)
    assert again.files_hashed == 1  # too recent to trust its stat


def test_stat_cache_prune(ctx, tmp_path):
    with FileHasher(tmp_path / "stat.db", racy_window_ns=0) as h:
        digest_tree(ctx, hasher=h)
        time.sleep(0.01)
        assert h.prune(older_than_s=0) == 8


def test_manifest_diff_names_the_changes(ctx):
    old = digest_tree(ctx, ["app"]).manifest()
    (ctx / "app/main.py").write_bytes(b"changed")
    os.chmod(ctx / "app/run.sh", 0o644)
    (ctx / "app/new.txt").write_bytes(b"n")
    os.unlink(ctx / "app/link")
    new = digest_tree(ctx, ["app"]).manifest()
    changes = diff_manifests(old, new)
    assert [(c.path, c.change) for c in changes] == [
        ("app/link", "removed"),
        ("app/main.py", "modified"),
        ("app/new.txt", "added"),
        ("app/run.sh", "mode"),
    ]
    assert str(changes[1]) == "app/main.py: content changed"
