"""Docker reference normalization and WWW-Authenticate parsing (pure functions)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from tlimage.errors import OCIError
from tlimage.oci import auth
from tlimage.oci.pull import TarChecker, normalize_platform, select_platform
from tlimage.oci.reference import parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, want", [
    ("debian", "docker.io/library/debian:latest"),
    ("debian:bookworm", "docker.io/library/debian:bookworm"),
    ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
    ("library/debian", "docker.io/library/debian:latest"),
    ("docker.io/debian", "docker.io/library/debian:latest"),
    ("index.docker.io/library/debian:12", "docker.io/library/debian:12"),
    ("user/img", "docker.io/user/img:latest"),
    ("ghcr.io/org/img", "ghcr.io/org/img:latest"),
    ("localhost/img:1", "localhost/img:1"),
    ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000/a/b/c:tag"),
    (f"ghcr.io/org/img@{D}", f"ghcr.io/org/img@{D}"),
    (f"debian:12@{D}", f"docker.io/library/debian:12@{D}"),
    (f"debian@{D}", f"docker.io/library/debian@{D}"),
    (f"docker.io/library/debian@{D}", f"docker.io/library/debian@{D}"),
    (f"index.docker.io/user/img@{D}", f"docker.io/user/img@{D}"),
    ("[::1]:5000/img", "[::1]:5000/img:latest"),
])  # fmt: skip
def test_normalization(text, want):
    assert str(parse(text)) == want


def test_parts_and_familiar_form():
    r = parse("python:3.12-slim")
    assert (r.registry, r.repository, r.tag, r.digest) == ("docker.io", "library/python",
                                                           "3.12-slim", None)  # fmt: skip
    assert r.api_host == "registry-1.docker.io" and r.familiar() == "python:3.12-slim"
    assert parse(f"x@{D}").selector == D and parse(f"x@{D}").tag is None


@pytest.mark.parametrize("text, msg", [
    ("", "empty"),
    ("Debian", "must be lowercase"),
    ("debian:", "tag ''"),
    ("debian:-x", "tag '-x'"),
    ("debian@sha256:abc", "digest"),
    ("debian@md5", "digest"),
    ("a b", "white space"),
    ("ghcr.io/", "no repository"),
    ("foo//bar", "component ''"),
])  # fmt: skip
def test_bad_references_say_what_is_wrong(text, msg):
    with pytest.raises(OCIError, match=msg):
        parse(text)


def test_challenge_parsing():
    [ch] = auth.parse_challenges(
        'Bearer realm="https://auth.docker.io/token",'
        'service="registry.docker.io",'
        'scope="repository:library/debian:pull,push"'
    )
    assert ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/debian:pull,push",
    }
    chs = auth.parse_challenges('Basic realm="x y", Bearer realm=http://t/token,error=bad')
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[1].params == {"realm": "http://t/token", "error": "bad"}
    assert auth.parse_challenges('Bearer realm="a\\"b"')[0].params["realm"] == 'a"b'


def test_credentials_from_auth_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker/config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "reg.example:5000": {"auth": base64.b64encode(b"u:p:with:colons").decode()},
                }
            }
        )
    )
    c = auth.lookup_credentials("registry-1.docker.io")
    assert (c.username, c.password) == ("hub", "pw")
    c = auth.lookup_credentials("reg.example:5000")
    assert (c.username, c.password) == ("u", "p:with:colons")
    assert auth.lookup_credentials("other.example") is None
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps({"auths": {"reg.example:5000": {"username": "x", "password": "y"}}})
    )
    assert auth.lookup_credentials("reg.example:5000", (str(extra),)).username == "x"
    extra.write_text("{not json")
    with pytest.raises(OCIError, match="extra.json: cannot read"):
        auth.lookup_credentials("reg.example:5000", (str(extra),))


def test_platforms():
    assert normalize_platform("linux/x86_64") == "linux/amd64"
    assert normalize_platform("arm64") == "linux/arm64"
    assert normalize_platform("linux/arm64/v8") == "linux/arm64"
    idx = {
        "manifests": [
            {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:b",
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
            },
            {
                "digest": "sha256:c",
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            },
        ]
    }
    assert select_platform(idx, "linux/amd64", "x") == "sha256:a"
    assert select_platform(idx, "linux/arm", "x") == "sha256:b"
    with pytest.raises(OCIError, match="the index has: linux/amd64, linux/arm/v7$"):
        select_platform(idx, "linux/ppc64le", "x")


def _tar(entries) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 512, 100000])
def test_tar_checker(chunk):
    import tarfile

    def ti(name, typ=tarfile.REGTYPE, size=0, link=""):
        t = tarfile.TarInfo(name)
        t.type, t.size, t.linkname = typ, size, link
        return t

    good = _tar([(ti("a/" + "x" * 150, size=3), b"abc"), (ti("l", tarfile.SYMTYPE, link="/etc"),
                 None), (ti("h", tarfile.LNKTYPE, link="a/" + "x" * 150), None)])  # fmt: skip

    def run(data):
        c = TarChecker("layer", "ref")
        for i in range(0, len(data), chunk):
            c.feed(data[i : i + chunk])
        c.finish()
        return c.entries

    assert run(good) == 3
    assert run(_tar([(ti("dev/console", tarfile.CHRTYPE), None)])) == 1
    # Device nodes are accepted anywhere, as Docker accepts them (tlimage._fs.refused_entry).
    assert run(_tar([(ti("tmp/sda", tarfile.BLKTYPE), None)])) == 1
    for bad, msg in [
        (_tar([(ti("../x", size=1), b"1")]), "leaves the tree"),
        (_tar([(ti("h", tarfile.LNKTYPE, link="../../etc/shadow"), None)]), "hard link"),
        (good[:700], "ends in the middle"),
        (b"x" * 1024, "checksum"),
    ]:
        with pytest.raises(OCIError, match=msg):
            run(bad)


def test_credential_helpers(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'if [ "$server" = reg.example ]; then '
        'echo \'{"Username":"u","Secret":"s"}\'; '
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credHelpers": {"reg.example": "fake"}, "credsStore": "fake"}))
    c = auth.lookup_credentials("reg.example", (str(cfg),))
    assert (c.username, c.password, c.source) == ("u", "s", "docker-credential-fake")
    assert auth.lookup_credentials("other.example", (str(cfg),)) is None
    cfg.write_text(json.dumps({"credHelpers": {"reg.example": "missing"}}))
    with pytest.raises(OCIError, match="docker-credential-missing .* is not installed"):
        auth.lookup_credentials("reg.example", (str(cfg),))
