"""Build secrets: `--secret` values as buildx reads them, a secret's bytes, and the `Redactor`
that masks secret values in a step's output."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tlimage.builder.mounts.spec import MountError

MAX_SECRET_SIZE = 500 * 1024  # BuildKit's limit for one secret
MASK = b"****"
MIN_MASKED = 4  # shorter secrets are not masked in logs: that would garble ordinary output


# -- secrets ------------------------------------------------------------------------------------


def secret_bytes(sid: str, value: Path | bytes | str) -> bytes:
    """A secret's bytes from `BuildOptions.secrets`. Errors never show the value."""
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, os.PathLike):
        try:
            with open(value, "rb") as f:
                data = f.read(MAX_SECRET_SIZE + 1)
        except OSError as e:
            raise MountError(f"secret {sid!r}: cannot read {os.fspath(value)}: "
                             f"{e.strerror}") from None  # fmt: skip
    else:
        raise MountError(f"secret {sid!r}: expected bytes (the value) or a Path (a file), got "
                         f"{type(value).__name__}")  # fmt: skip
    if len(data) > MAX_SECRET_SIZE:
        raise MountError(f"secret {sid!r} is larger than {MAX_SECRET_SIZE // 1024} KiB")
    return data


def parse_secret(text: str) -> tuple[str, Path | bytes]:
    """One `--secret` value as buildx reads it: `id=NAME[,src|source=PATH][,env=VAR]
    [,type=file|env]`. With neither src nor env, the variable NAME if set, else the file NAME.
    An `env=` secret is read from this process's environment now."""
    fields: dict[str, str] = {}
    for field in (f.strip() for f in text.split(",")):
        if not field:
            continue
        key, eq, value = field.partition("=")
        key = key.strip().lower()
        if not eq:
            raise MountError(f"--secret {text!r}: invalid field {field!r}, must be key=value")
        if key == "src":
            key = "source"
        if key not in ("id", "source", "env", "type"):
            raise MountError(f"--secret {text!r}: unexpected key {key!r}; allowed: id, src, "
                             "env, type")  # fmt: skip
        fields[key] = value
    typ = fields.get("type")
    if typ not in (None, "file", "env"):
        raise MountError(f"--secret {text!r}: unsupported type {typ!r}; allowed: file, env")
    sid = fields.get("id", "")
    src, env = fields.get("source", ""), fields.get("env", "")
    if typ == "env" and not env:
        env, src = src, ""
    if not sid:
        sid = src or env
    if not sid:
        raise MountError(f"--secret {text!r}: an id is required (id=NAME)")
    if not src and not env:
        if sid in os.environ:
            env = sid
        else:
            src = sid
    if env:
        if env not in os.environ:
            raise MountError(f"--secret {text!r}: environment variable {env} is not set")
        return sid, os.environb[env.encode()]
    return sid, Path(src).expanduser()


def parse_secrets(texts: Iterable[str]) -> dict[str, Path | bytes]:
    return dict(parse_secret(t) for t in texts)


class Redactor:
    """Masks secret values in a step's output streams. A chunk's tail that could begin a secret
    is held back until the next chunk (or `flush`), so a value split across chunks is caught
    too. Values shorter than MIN_MASKED are not masked; a value is masked without its trailing
    newline (the log keeps its lines), and each line of a multi-line value also on its own."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        values: set[bytes] = set()
        for s in secrets:
            for v in (s.rstrip(b"\r\n"), *s.splitlines()):
                if len(v.strip()) >= MIN_MASKED:
                    values.add(v)
        self.values = sorted(values, key=len, reverse=True)
        self._pending: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def feed(self, stream: str, data: bytes) -> bytes:
        if not self.values:
            return data
        buf = self._pending.pop(stream, b"") + data
        for v in self.values:
            buf = buf.replace(v, MASK)
        cut = len(buf)
        longest = len(self.values[0])
        for i in range(max(0, len(buf) - longest + 1), len(buf)):
            tail = buf[i:]
            if any(v.startswith(tail) for v in self.values):
                cut = i
                break
        if cut < len(buf):
            self._pending[stream] = buf[cut:]
        return buf[:cut]

    def flush(self, stream: str) -> bytes:
        return self._pending.pop(stream, b"")
