"""`.dockerignore` semantics, pinned against the behaviour of moby/patternmatcher (the cases in
its test table) and Go's filepath.Match syntax."""

import pytest

from tlimage.cache.ignore import (
    BadPattern,
    IgnoreMatcher,
    IgnorePatternError,
    find_ignore_file,
    go_clean,
    load_ignore,
    read_ignore_text,
)

# (pattern, path, excluded?) for MatchesOrParentMatches with one pattern
SINGLE = [
    ("**", "file", True),
    ("**", "file/", True),
    ("**/", "file", True),
    ("**", "/", True),
    ("**", "dir/file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/dir2/file/", True),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "file", True),
    ("**file", "dir/dir/file", True),
    ("**/file*", "dir/dir/file.txt", True),
    ("**/file*.txt*", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("a[b-d]e", "ae", False),
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcdef", False),
    ("abc.def", "abc.def", True),
    ("abc?def", "abcZdef", True),
    ("abc?def", "abcdef", False),
    ("**/foo/bar", "dir/dir2/foo/bar", True),
    ("abc/**", "abc", False),
    ("abc/**", "abc/def/ghi", True),
    ("**/.foo", ".foo", True),
    ("**/.foo", "bar.foo", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a(b)c/def", "a(b)c/xyz", False),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("a\\\\", "a\\", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "ab", False),
    # Go filepath.Match cases
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "ab/c", True),  # through the parent "ab"
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True),
    ("a*b?c*x", "abxbbxdbxebxczzy", False),
    ("ab[^c]", "abc", False),
    ("ab[^e-g]", "abc", True),
    ("a?b", "a\u263ab", True),
    ("a???b", "a\u263ab", False),
    ("[a-\u03b6]*", "\u03b1", True),
    ("*[a-\u03b6]", "A", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("[\\]a]", "]", True),
    ("[\\-]", "-", True),
    ("[x\\-]", "-", True),
    ("[x\\-]", "z", False),
    ("[\\-x]", "a", False),
    ("*x", "xxx", True),
    # anchored at the root, unlike .gitignore
    ("foo", "a/foo", False),
    ("foo", "foo/bar/baz", True),
    ("/foo", "foo", True),
    ("./foo/", "foo/x", True),
    ("foo/../bar", "bar", True),
    # Go regexp class syntax reaches through moby's translation
    ("[[:digit:]]x", "7x", True),
    ("[[:digit:]]x", "ax", False),
    # quirk kept from moby: "^" stays a regexp anchor once the pattern is a regexp
    ("a^b", "a^b", True),
    ("a^b*", "a^bc", False),
]


@pytest.mark.parametrize("pattern,path,excluded", SINGLE)
def test_single_pattern(pattern, path, excluded):
    assert IgnoreMatcher([pattern]).matches(path) is excluded


MULTI = [
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
    (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
    (["!fileutils.go", "*.go"], "fileutils.go", True),
    (["*.go", "!fileutils.go"], "fileutils.go", False),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["docs", "!docs/README.md"], "docs/other.md", True),
    (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
    (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
]


@pytest.mark.parametrize("patterns,path,excluded", MULTI)
def test_pattern_order(patterns, path, excluded):
    assert IgnoreMatcher(patterns).matches(path) is excluded


def test_root_is_never_excluded():
    assert IgnoreMatcher(["*", "**"]).matches(".") is False


def test_evaluate_with_parent_results_agrees():
    m = IgnoreMatcher(["a*", "!a/keep", "**/*.log", "!**/important.log", "x/**"])
    paths = ["a", "a/keep", "a/keep/deep", "a/drop", "b/c.log", "b/important.log", "x", "x/y/z"]
    for path in paths:
        parts = path.split("/")
        info = None
        for i in range(1, len(parts)):
            _, info = m.evaluate("/".join(parts[:i]), info)
        assert m.evaluate(path, info)[0] == m.matches(path), path


@pytest.mark.parametrize(
    "pattern",
    ["[", "[^", "[^bc", "a[", "\\", "[]a]", "[-]", "[x-]", "[-x]", "[a-b-c]", "[[:nope:]]"],
)
def test_malformed_patterns(pattern):
    with pytest.raises(BadPattern):
        IgnoreMatcher([pattern])


def test_single_bang_is_an_error():
    with pytest.raises(BadPattern, match='illegal exclusion pattern: "!"'):
        IgnoreMatcher(["!"])


def test_read_ignore_text_rules():
    text = "\ufeff# comment\n  # not a comment\n\n  *.pyc  \n! /keep.pyc\n/abs/\r\nfoo//bar/.\n"
    assert [p.text for p in read_ignore_text(text)] == [
        "# not a comment",
        "*.pyc",
        "!keep.pyc",
        "abs",
        "foo/bar",
    ]
    m = IgnoreMatcher.from_text(text)
    assert m.matches("x.pyc") and not m.matches("keep.pyc") and m.matches("abs/x")
    assert m.matches("# not a comment")


def test_error_names_file_line_and_column(tmp_path):
    f = tmp_path / ".dockerignore"
    f.write_text("ok\n\n   bad[\n")
    with pytest.raises(IgnorePatternError) as e:
        IgnoreMatcher.from_file(f)
    text = str(e.value)
    assert text.startswith(f"{f}:3:4: bad pattern 'bad['")
    assert "   bad[" in text and "\n" + " " * (len("   3 | ") + 3) + "^" in text


def test_find_ignore_file_prefers_dockerfile_specific(tmp_path):
    (tmp_path / ".dockerignore").write_text("a\n")
    assert find_ignore_file(tmp_path) == tmp_path / ".dockerignore"
    df = tmp_path / "build" / "Dockerfile"
    df.parent.mkdir()
    df.write_text("FROM scratch\n")
    assert find_ignore_file(tmp_path, df) == tmp_path / ".dockerignore"
    (tmp_path / "build" / "Dockerfile.dockerignore").write_text("b\n")
    assert find_ignore_file(tmp_path, df) == tmp_path / "build" / "Dockerfile.dockerignore"
    assert load_ignore(tmp_path, df).patterns == ["b"]
    assert not load_ignore(tmp_path / "build")


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("", "."),
        ("a//b", "a/b"),
        ("//a", "/a"),
        ("a/./b/../c/", "a/c"),
        ("../a", "../a"),
        ("/..", "/"),
    ],
)
def test_go_clean(raw, clean):
    assert go_clean(raw) == clean
