"""Registry credentials and the `WWW-Authenticate` challenge.

Credentials for a registry host are looked up, first match wins, in: the files given with
`--registry-auth` (`RegistryConfig.auth_files`), `$REGISTRY_AUTH_FILE`, `~/.docker/config.json`
(or `$DOCKER_CONFIG/config.json`), `$XDG_RUNTIME_DIR/containers/auth.json`. Each file is the
Docker `config.json` shape: `auths` (base64 `auth` of user:password, or an `identitytoken`),
`credHelpers` per host and a default `credsStore` (a `docker-credential-<name> get` helper).

A 401 carries a challenge: `Basic realm=…` (send the credentials) or `Bearer realm=…,
service=…,scope=…` (get a token from the realm, anonymously or with the credentials, and send
it). Tokens are kept per (realm, service, scope) until they expire.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tlimage.errors import OCIError

DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                        "registry-1.docker.io")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a `WWW-Authenticate` value (RFC 7235): schemes followed by comma-separated
    `key=value` or `key="quoted, value"` pairs; several challenges may share one header."""
    out: list[Challenge] = []
    i, n = 0, len(header)
    current: Challenge | None = None
    while i < n:
        while i < n and header[i] in " \t,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and header[j] not in " \t,=":
            j += 1
        token = header[i:j]
        k = j
        while k < n and header[k] in " \t":
            k += 1
        if k < n and header[k] == "=" and current is not None:
            k += 1
            while k < n and header[k] in " \t":
                k += 1
            if k < n and header[k] == '"':
                k += 1
                buf = []
                while k < n and header[k] != '"':
                    if header[k] == "\\" and k + 1 < n:
                        k += 1
                    buf.append(header[k])
                    k += 1
                value = "".join(buf)
                k += 1
            else:
                m = k
                while m < n and header[m] not in ",":
                    m += 1
                value = header[k:m].strip()
                k = m
            current.params[token.lower()] = value
            i = k
        else:
            current = Challenge(token.lower(), {})
            out.append(current)
            i = j
    return out


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token (`identitytoken` in config.json)
    source: str = ""  # where they came from, for error messages

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_files(extra: tuple[str, ...] = ()) -> list[Path]:
    files = [Path(p).expanduser() for p in extra]
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env))
    docker_dir = os.environ.get("DOCKER_CONFIG")
    files.append(Path(docker_dir) / "config.json" if docker_dir
                 else Path.home() / ".docker" / "config.json")  # fmt: skip
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers" / "auth.json")
    return files


def _host_keys(host: str) -> tuple[str, ...]:
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        return DOCKER_HUB_AUTH_KEYS
    return (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"https://{host}/v2/")  # fmt: skip


def lookup_credentials(host: str, extra_files: tuple[str, ...] = ()) -> Credentials | None:
    """The credentials for `host` from the auth files (see the module docstring), or None."""
    keys = _host_keys(host)
    for path in auth_files(extra_files):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise OCIError(f"{path}: cannot read registry credentials: {e}") from None
        if not isinstance(doc, dict):
            raise OCIError(f"{path}: registry credentials must be a JSON object")
        helpers = doc.get("credHelpers") or {}
        for key in keys:
            if key in helpers:
                return _from_helper(helpers[key], host, path)
        auths = doc.get("auths") or {}
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict) and (entry.get("auth") or entry.get("identitytoken")
                                            or entry.get("username")):  # fmt: skip
                return _from_entry(entry, f"{path} ({key})")
        if store := doc.get("credsStore"):
            found = _from_helper(store, host, path, required=False)
            if found is not None:
                return found
    return None


def _from_entry(entry: dict, source: str) -> Credentials:
    user, password = entry.get("username", ""), entry.get("password", "")
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise OCIError(f"{source}: `auth` is not base64 of user:password") from None
    return Credentials(user, password, entry.get("identitytoken", ""), source)


def _from_helper(name: str, host: str, path: Path, required: bool = True) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{name}")
    if exe is None:
        if not required:
            return None
        raise OCIError(f"{path}: credential helper docker-credential-{name} for {host} is not "
                       "installed")  # fmt: skip
    server = "https://index.docker.io/v1/" if host in DOCKER_HUB_AUTH_KEYS else host
    try:
        proc = subprocess.run([exe, "get"], input=server.encode(), capture_output=True,
                              timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OCIError(f"credential helper docker-credential-{name} failed for {host}: {e}"
                       ) from None  # fmt: skip
    if proc.returncode != 0:
        if b"not found" in proc.stdout.lower() + proc.stderr.lower():
            return None
        raise OCIError(f"credential helper docker-credential-{name} failed for {host}: "
                       f"{proc.stderr.decode(errors='replace').strip()}")  # fmt: skip
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise OCIError(f"credential helper docker-credential-{name} printed no JSON") from None
    user, secret = doc.get("Username", ""), doc.get("Secret", "")
    source = f"docker-credential-{name}"
    if user == "<token>":
        return Credentials(identity_token=secret, source=source)
    return Credentials(user, secret, source=source)


class TokenCache:
    """Bearer tokens per (realm, service, scope), reused until shortly before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            found = self._tokens.get(key)
        if found and found[1] > time.monotonic():
            return found[0]
        return None

    def put(self, key: tuple[str, str, str], token: str, expires_in: float) -> None:
        with self._lock:
            self._tokens[key] = (token, time.monotonic() + max(expires_in - 10, 5))
