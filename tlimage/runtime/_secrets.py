"""Secrets: named values kept per project in the state folder, injected into sandboxes.

    <state dir>/secrets/<project>.json     {"NAME": "value", ...}   mode 0600, folder 0700

Values are written atomically (a 0600 temporary file renamed over the old one, under a lock)
and only ever leave this module as environment entries handed to a backend for one exec or
spawn: never in a sandbox record, a log, a snapshot, a clone's image or an argument vector.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tlimage import _layout
from tlimage._fs import write_atomic
from tlimage._paths import project_name, state_dir
from tlimage.errors import RuntimeError_

SECRETS_DIR = _layout.SECRETS.path
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_VALUE = 64 * 1024


def check_secret_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise RuntimeError_(f"invalid secret name {name!r}: use an environment variable name "
                            "(letters, digits and '_', not starting with a digit)")  # fmt: skip
    return name


def _folder() -> Path:
    d = state_dir() / SECRETS_DIR
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(d, 0o700)
    return d


def _path(project: str | None) -> Path:
    return _folder() / f"{project_name(project)}.json"


@contextlib.contextmanager
def _locked(project: str | None) -> Iterator[Path]:
    path = _path(project)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise RuntimeError_(
            f"{path}: the secrets store is not valid JSON ({e.args[0]})",
            hint="fix or remove the file; values are not shown",
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RuntimeError_(f"{path}: the secrets store is not a JSON object of strings")
    return data


def _write(path: Path, data: dict[str, str]) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True), 0o600)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_secret(name: str, value: str, *, project: str | None = None) -> bool:
    """Stores `value` under `name`; True when it replaced an earlier value."""
    check_secret_name(name)
    if "\0" in value:
        raise RuntimeError_(f"secret {name}: the value contains a NUL byte, which an "
                            "environment variable cannot hold")  # fmt: skip
    if len(value.encode()) > MAX_VALUE:
        raise RuntimeError_(f"secret {name}: the value is larger than {MAX_VALUE // 1024} KiB")
    with _locked(project) as path:
        data = _read(path)
        existed = name in data
        data[name] = value
        _write(path, data)
    return existed


def remove_secret(name: str, *, project: str | None = None) -> None:
    check_secret_name(name)
    with _locked(project) as path:
        data = _read(path)
        if name not in data:
            raise RuntimeError_(f"no secret {name!r} in project {project_name(project)!r}",
                                hint="list them with `tl secrets ls`")  # fmt: skip
        del data[name]
        _write(path, data)


def list_secrets(*, project: str | None = None) -> list[str]:
    """The names of the project's secrets, sorted (values are never returned)."""
    return sorted(_read(_path(project)))


def check_secrets_exist(names: Iterable[str], *, project: str | None = None) -> list[str]:
    names = [check_secret_name(n) for n in names]
    have = set(list_secrets(project=project))
    missing = [n for n in names if n not in have]
    if missing:
        raise RuntimeError_(f"no secret {', '.join(map(repr, missing))} in project "
                            f"{project_name(project)!r}",
                            hint="store it first: tl secrets set NAME (reads the value "
                                 "from stdin)")  # fmt: skip
    return list(dict.fromkeys(names))


def secret_env(names: Iterable[str], *, project: str) -> list[str]:
    """KEY=VALUE entries for `names`, read now (a value changed since the sandbox started is
    the new one); a secret removed since is an error naming it."""
    names = list(names)
    if not names:
        return []
    data = _read(_path(project))
    missing = [n for n in names if n not in data]
    if missing:
        raise RuntimeError_(f"secret {', '.join(map(repr, missing))} of this sandbox was "
                            f"removed from project {project!r}",
                            hint="set it again with `tl secrets set NAME`")  # fmt: skip
    return [f"{n}={data[n]}" for n in names]
