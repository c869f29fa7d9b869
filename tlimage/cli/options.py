"""Option types shared by the image and sandbox commands."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Isolation(StrEnum):
    """Where build steps and sandboxes run (`auto`: the microVM when KVM works)."""

    auto = "auto"
    microvm = "microvm"
    namespace = "namespace"
    namespace_unsafe = "namespace-unsafe"  # runs where a layer of isolation is missing


ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", envvar="TLIMAGE_PROJECT",
                 help="Project that scopes image and sandbox names (default: 'default')."),
]  # fmt: skip
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", envvar="TLIMAGE_CACHE_DIR", help="Layer cache folder."),
]


# Registries (tlimage/oci). Each also reads an environment variable, for CI.
PlatformOpt = Annotated[
    str, typer.Option("--platform", envvar="TLIMAGE_PLATFORM",
                      help="Platform of registry images to pull (OS/ARCH[/VARIANT]).")
]  # fmt: skip
InsecureRegistryOpt = Annotated[
    list[str] | None,
    typer.Option("--insecure-registry", help="HOST[:PORT] reached over plain HTTP or unverified "
                 "TLS (repeatable; also $TLIMAGE_INSECURE_REGISTRIES, comma-separated)."),
]  # fmt: skip
RegistryAuthOpt = Annotated[
    list[str] | None,
    typer.Option("--registry-auth", help="A Docker config.json-style credentials file, tried "
                 "before $REGISTRY_AUTH_FILE and ~/.docker/config.json (repeatable)."),
]  # fmt: skip


def registry_config(insecure: list[str] | None, auth: list[str] | None):  # noqa: ANN201
    from tlimage.oci.client import RegistryConfig

    return RegistryConfig.from_env(insecure=insecure or (), auth_files=auth or ())


# `-i` means interactive in tl, as in Docker (`tl sbx exec -i`); the old `-i NAME` of `image
# compile`, `image create` and `new` still works, hidden, with a deprecation notice.
OldImageOpt = Annotated[str | None, typer.Option("-i", hidden=True)]


def deprecated_i(new: str | None, old: str | None, command: str, instead: str) -> str | None:
    """The value of an option that used to be spelled `-i`: `old` (after a notice), or `new`."""
    if old is None:
        return new
    if new is not None and new != old:
        raise typer.BadParameter(f"-i {old!r} and {instead} {new!r} disagree; drop -i",
                                 param_hint="-i")  # fmt: skip
    print(f"tl: `{command} -i NAME` is deprecated: -i means interactive in tl, as in docker; "
          f"use {instead} NAME", file=sys.stderr)  # fmt: skip
    return old
