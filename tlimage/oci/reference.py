"""Docker image references: `debian`, `python:3.12-slim`, `ghcr.io/org/img@sha256:…`.

Normalized as Docker does (distribution/reference): a first component with a `.` or `:`, or
`localhost`, is a registry host; otherwise the image is on `docker.io`, and a one-component
name there lives under `library/`. The tag defaults to `latest` unless a digest is given.
`index.docker.io` is `docker.io`; its API is served at `registry-1.docker.io`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlimage.errors import OCIError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
    r"(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*"
    r"(?::[0-9]+)?|\[[0-9A-Fa-f:]+\](?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256 = re.compile(r"sha256:[a-f0-9]{64}")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalized reference. `tag` is None when only a digest was given."""

    registry: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repository: str  # "library/debian"
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What the manifest endpoint is asked for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def familiar(self) -> str:
        """The short form people write: `debian:bookworm`, `ghcr.io/x/y@sha256:…`."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        return name + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")  # fmt: skip

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")  # fmt: skip


def parse(text: str, *, default_tag: str = "latest") -> Reference:
    """Normalize a reference, or raise `OCIError` saying which part is wrong."""
    ref = text.strip()
    if not ref:
        raise OCIError("empty image reference")
    if any(c.isspace() for c in ref):
        raise OCIError(f"invalid image reference {text!r}: contains white space", ref=text)
    rest, at, digest = ref.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise OCIError(
            f"invalid image reference {text!r}: digest {digest!r} is not ALGORITHM:HEX",
            ref=text, hint="a pinned reference looks like name@sha256:<64 hex digits>",
        )  # fmt: skip
    if at and digest.startswith("sha256:") and not _SHA256.fullmatch(digest):
        raise OCIError(f"invalid image reference {text!r}: a sha256 digest has 64 lowercase hex "
                       "digits", ref=text)  # fmt: skip
    # A tag is after the last ':' that comes after the last '/'.
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = None
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise OCIError(
                f"invalid image reference {text!r}: tag {tag!r} must be letters, digits, '_', "
                "'.' or '-' (at most 128, not starting with '.' or '-')", ref=text)  # fmt: skip
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not _DOMAIN.fullmatch(first):
            raise OCIError(f"invalid image reference {text!r}: bad registry host {first!r}",
                           ref=text)  # fmt: skip
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if not path:
        raise OCIError(f"invalid image reference {text!r}: no repository name", ref=text)
    for comp in path.split("/"):
        if not _COMPONENT.fullmatch(comp):
            why = ("must be lowercase" if comp.lower() != comp and _COMPONENT.fullmatch(
                comp.lower()) else "may hold lowercase letters, digits and single '.', '_', "
                "'__' or '-' separators")  # fmt: skip
            raise OCIError(f"invalid image reference {text!r}: repository component {comp!r} "
                           f"{why}", ref=text)  # fmt: skip
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise OCIError(f"invalid image reference {text!r}: name longer than {_MAX_NAME}",
                       ref=text)  # fmt: skip
    if tag is None and not at:
        tag = default_tag
    return Reference(registry, path, tag, digest if at else None)


def looks_remote(text: str) -> bool:
    """Whether a base name can only mean a registry image (it names a host or a digest) — as
    opposed to `name[:tag]`, which may also be an image registered locally."""
    first, sep, _ = text.partition("/")
    return "@" in text or bool(sep)
