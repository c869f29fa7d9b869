"""A client for the Registry HTTP API v2 (the OCI distribution spec).

httpx carries the HTTP: one connection pool shared by the threads that fetch layers in
parallel (keep-alive across blob requests), streamed bodies, redirects to blob storage, and the
proxy environment variables, none of which `urllib` pools or streams as simply.

What this module adds to it:
- auth: a 401's challenge is answered (anonymous or credentialed bearer token, or basic auth)
  and the request repeated; the answer is reused for later requests to that host and scope;
- retries: 429 (waiting `Retry-After`), 500/502/503/504, connection resets and time-outs are
  retried with exponential back-off a bounded number of times, then reported clearly;
- TLS with the host's CA bundle (the system OpenSSL paths, not certifi), plus per-host CAs in
  `certs.d/<host>/*.crt` folders as Docker and Podman read them; plain HTTP (or unverified
  TLS) only for hosts named insecure;
- mirrors: reads of a registry go to its mirrors first, then to the registry itself;
- limits: a manifest over 4 MiB is refused; a blob is read no further than its declared size.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

from tlimage.errors import OCIError
from tlimage.oci import auth
from tlimage.oci.reference import DOCKER_HUB, Reference

MAX_MANIFEST = 4 << 20
CHUNK = 1 << 20

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CONFIG_ENV = "TLIMAGE_REGISTRIES_CONF"
MIRRORS_ENV = "TLIMAGE_REGISTRY_MIRRORS"
INSECURE_ENV = "TLIMAGE_INSECURE_REGISTRIES"
AUTH_ENV = "TLIMAGE_REGISTRY_AUTH"
CERTS_ENV = "TLIMAGE_REGISTRY_CERTS_DIR"
DEFAULT_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


@dataclass
class RegistryConfig:
    """How to reach registries. `from_env()` reads the config file and the environment; CLI
    flags are added on top."""

    insecure: tuple[str, ...] = ()  # hosts reached over plain HTTP / unverified TLS
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # registry -> mirrors
    auth_files: tuple[str, ...] = ()
    certs_dirs: tuple[str, ...] = DEFAULT_CERTS_DIRS
    ca_bundle: str | None = None  # default: the system's (OpenSSL's default paths)
    retries: int = 4
    backoff: float = 0.5  # seconds, doubled per attempt
    max_wait: float = 30.0  # the longest Retry-After honoured
    timeout: float = 60.0

    @classmethod
    def from_env(cls, *, insecure: Iterable[str] = (), auth_files: Iterable[str] = (),
                 mirrors: Iterable[str] = ()) -> RegistryConfig:  # fmt: skip
        """`$TLIMAGE_REGISTRIES_CONF` (default `~/.config/tlimage/registries.json`:
        `{"mirrors": {"docker.io": ["host:port"]}, "insecure": ["host:port"]}`), then
        `$TLIMAGE_REGISTRY_MIRRORS` (`docker.io=host:port,…`), `$TLIMAGE_INSECURE_REGISTRIES`,
        `$TLIMAGE_REGISTRY_AUTH`, and the arguments (CLI flags)."""
        cfg = cls()
        path = os.environ.get(CONFIG_ENV)
        conf = Path(path) if path else _config_home() / "tlimage" / "registries.json"
        if conf.is_file():
            try:
                doc = json.loads(conf.read_text())
            except (OSError, ValueError) as e:
                raise OCIError(f"{conf}: cannot read the registries configuration: {e}") from None
            if not isinstance(doc, dict):
                raise OCIError(f"{conf}: must be a JSON object")
            for reg, ms in (doc.get("mirrors") or {}).items():
                cfg.mirrors[reg] = tuple([ms] if isinstance(ms, str) else ms)
            cfg.insecure += tuple(doc.get("insecure") or ())
            cfg.auth_files += tuple(doc.get("auth_files") or ())
            if doc.get("certs_dir"):
                cfg.certs_dirs = (doc["certs_dir"], *cfg.certs_dirs)
        specs = [*_split(os.environ.get(MIRRORS_ENV, "")), *mirrors]
        for spec in specs:
            reg, eq, mirror = spec.partition("=")
            if not eq or not reg or not mirror:
                raise OCIError(f"invalid registry mirror {spec!r}: expected REGISTRY=MIRROR_HOST")
            cfg.mirrors[reg] = (*cfg.mirrors.get(reg, ()), mirror)
        cfg.insecure += (*_split(os.environ.get(INSECURE_ENV, "")), *insecure)
        if env := os.environ.get(AUTH_ENV):
            cfg.auth_files = (env, *cfg.auth_files)
        cfg.auth_files = (*auth_files, *cfg.auth_files)
        if env := os.environ.get(CERTS_ENV):
            cfg.certs_dirs = (env, *cfg.certs_dirs)
        return cfg


def _config_home() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one repository is read or written: a host (the registry, or a mirror of it)."""

    host: str
    repository: str
    mirror_of: str | None = None

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}"


@dataclass
class Fetched:
    data: bytes
    media_type: str
    digest: str


class RegistryClient:
    """Thread-safe; one per operation (pull, push) or shared by a build."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        import httpx

        self.config = config or RegistryConfig.from_env()
        self._httpx = httpx
        self._clients: dict[tuple[str, bool], Any] = {}
        self._lock = threading.Lock()
        self._schemes: dict[str, str] = {}
        self._answers: dict[tuple[str, str], str] = {}  # (host, scope) -> Authorization
        self._challenges: dict[str, list[auth.Challenge]] = {}
        self._tokens = auth.TokenCache()
        self._creds: dict[str, auth.Credentials | None] = {}
        self._idle: dict[tuple[str, str], list[Any]] = {}  # http.client connections for blobs

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints --------------------------------------------------------------------------

    def endpoints(self, ref: Reference, *, write: bool = False) -> list[Endpoint]:
        """Mirrors first (reads only), then the registry itself."""
        out = []
        if not write:
            for m in self.config.mirrors.get(ref.registry, ()):
                host, _, prefix = m.partition("/")
                repo = f"{prefix.strip('/')}/{ref.repository}" if prefix else ref.repository
                out.append(Endpoint(host, repo, ref.registry))
        out.append(Endpoint(ref.api_host, ref.repository))
        return out

    def insecure(self, host: str) -> bool:
        return host in self.config.insecure

    def _client(self, host: str, verify: bool) -> Any:
        key = (host, verify)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                ctx: Any = self._ssl_context(host) if verify else False
                client = self._httpx.Client(
                    verify=ctx, follow_redirects=True, trust_env=True,
                    timeout=self._httpx.Timeout(self.config.timeout, connect=15.0),
                    limits=self._httpx.Limits(max_connections=32, max_keepalive_connections=16),
                    headers={"User-Agent": "tlimage"},
                )  # fmt: skip
                self._clients[key] = client
        return client

    def _ssl_context(self, host: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.config.ca_bundle)
        for d in self.config.certs_dirs:
            folder = Path(d) / host
            if folder.is_dir():
                for f in sorted(folder.glob("*.crt")):
                    ctx.load_verify_locations(cafile=str(f))
                cert, key = folder / "client.cert", folder / "client.key"
                if cert.is_file() and key.is_file():
                    ctx.load_cert_chain(str(cert), str(key))
        return ctx

    # -- the request loop -------------------------------------------------------------------

    def request(
        self,
        method: str,
        ep: Endpoint,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        stream: bool = False,
        ref: str = "",
        ok: tuple[int, ...] = (200,),
        url: str | None = None,
    ) -> Any:
        """Send a request to `ep.host`, answering auth challenges and retrying transient
        failures. `content` makes the body afresh for each attempt. Returns the response (a
        streamed one when `stream`; the caller closes it) whose status is in `ok` or 404
        (the caller decides what a 404 means)."""
        httpx = self._httpx
        attempt = 0
        authed = False
        while True:
            scheme = self._schemes.get(ep.host, "https")
            target = url or f"{scheme}://{ep.host}/v2/{path}"
            verify = not self.insecure(ep.host)
            hdrs = dict(headers or {})
            answer = self._answers.get((ep.host, scope))
            if answer:
                hdrs["Authorization"] = answer
            try:
                client = self._client(ep.host, verify)
                req = client.build_request(method, target, headers=hdrs,
                                           content=content() if content else None)  # fmt: skip
                resp = client.send(req, stream=True)
            except (httpx.ConnectError, ssl.SSLError) as e:
                if scheme == "https" and not verify and url is None and (
                        isinstance(e, ssl.SSLError) or "SSL" in str(e)):  # fmt: skip
                    # An insecure host that speaks plain HTTP (or another thread found so).
                    self._schemes[ep.host] = "http"
                    continue
                attempt += 1
                # A mirror that cannot be reached is left at once: the next endpoint is its
                # fallback (as Docker and containerd fall back), not its retries' back-off.
                if attempt > self.config.retries or _unresolvable(e) or ep.mirror_of:
                    raise self._net_error(ep, ref, e, attempts=attempt) from None
                time.sleep(self._backoff(attempt))
                continue
            except (httpx.TransportError, OSError) as e:
                attempt += 1
                if attempt > self.config.retries:
                    raise self._net_error(ep, ref, e) from None
                time.sleep(self._backoff(attempt))
                continue
            if resp.status_code == 401 and not authed:
                header = resp.headers.get("www-authenticate", "")
                resp.close()
                self._answer(ep, scope, header, ref)
                authed = True
                continue
            if resp.status_code in _RETRY_STATUS:
                attempt += 1
                wait = self._retry_after(resp) if resp.status_code == 429 else None
                body = _read_small(resp)
                if attempt > self.config.retries:
                    raise OCIError(
                        f"{ref or ep}: {ep.host} answered {resp.status_code} "
                        f"{_reason(resp)} {attempt} times{_error_text(body)}",
                        ref=ref or None, hint="the registry is overloaded or failing; try again "
                        "later",
                    )  # fmt: skip
                time.sleep(wait if wait is not None else self._backoff(attempt))
                continue
            if resp.status_code in (401, 403):
                body = _read_small(resp)
                creds = self._creds.get(ep.host)
                tried = creds.source if creds else "none (anonymous)"
                raise OCIError(
                    f"{ref or ep}: access to {ep.host} denied ({resp.status_code}); credentials "
                    f"tried: {tried}{_error_text(body)}", ref=ref or None,
                    hint="log in (credentials in ~/.docker/config.json, $REGISTRY_AUTH_FILE or "
                    "--registry-auth FILE), or check the repository name",
                )  # fmt: skip
            if resp.status_code in ok or resp.status_code == 404:
                if not stream:
                    resp.read()
                    resp.close()
                return resp
            body = _read_small(resp)
            raise OCIError(f"{ref or ep}: {method} {path} on {ep.host} answered "
                           f"{resp.status_code} {_reason(resp)}{_error_text(body)}",
                           ref=ref or None)  # fmt: skip

    def _backoff(self, attempt: int) -> float:
        return min(self.config.backoff * (2 ** (attempt - 1)), self.config.max_wait)

    def _retry_after(self, resp: Any) -> float | None:
        value = resp.headers.get("retry-after")
        if not value:
            return None
        try:
            return min(max(float(value), 0.0), self.config.max_wait)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                when = parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError):
                return None
            return min(max(when - time.time(), 0.0), self.config.max_wait)

    def _net_error(self, ep: Endpoint, ref: str, e: Exception,
                   attempts: int | None = None) -> OCIError:  # fmt: skip
        if _unresolvable(e):
            return OCIError(f"{ref or ep}: cannot reach {ep.host}: its name does not resolve ({e})",
                            ref=ref or None, hint="no network here? name a mirror, e.g. "
                            f"{MIRRORS_ENV}=docker.io=mirror.example:5000 (or in "
                            f"${CONFIG_ENV})")  # fmt: skip
        return OCIError(
            f"{ref or ep}: cannot reach {ep.host} after "
            f"{_n(attempts or self.config.retries + 1, 'attempt')}: "
            f"{type(e).__name__}: {e}", ref=ref or None,
            hint=("the registry speaks plain HTTP? name it with --insecure-registry "
                  f"{ep.host}" if isinstance(e, ssl.SSLError) or "SSL" in str(e) else None),
        )  # fmt: skip

    def credentials(self, host: str) -> auth.Credentials | None:
        if host not in self._creds:
            self._creds[host] = auth.lookup_credentials(host, self.config.auth_files)
        return self._creds[host]

    def _answer(self, ep: Endpoint, scope: str, header: str, ref: str) -> None:
        challenges = auth.parse_challenges(header)
        creds = self.credentials(ep.host)
        for ch in challenges:
            if ch.scheme == "bearer":
                self._answers[(ep.host, scope)] = "Bearer " + self._token(ep, ch, scope, creds,
                                                                          ref)  # fmt: skip
                return
        for ch in challenges:
            if ch.scheme == "basic":
                if creds is None or not creds.username:
                    raise OCIError(
                        f"{ref or ep}: {ep.host} asks for a user name and password, and none "
                        "is configured for it", ref=ref or None,
                        hint="add them to ~/.docker/config.json (`auths`), $REGISTRY_AUTH_FILE "
                        "or a file given with --registry-auth",
                    )  # fmt: skip
                self._answers[(ep.host, scope)] = creds.basic()
                return
        raise OCIError(f"{ref or ep}: {ep.host} answered 401 with an authentication scheme "
                       f"tlimage does not speak: {header!r}", ref=ref or None)  # fmt: skip

    def _token(self, ep: Endpoint, ch: auth.Challenge, scope: str,
               creds: auth.Credentials | None, ref: str) -> str:  # fmt: skip
        realm = ch.params.get("realm")
        if not realm:
            raise OCIError(f"{ref or ep}: {ep.host}'s bearer challenge names no realm")
        service = ch.params.get("service", "")
        key = (realm, service, scope)
        if (cached := self._tokens.get(key)) is not None:
            return cached
        params = {"scope": scope} if scope else {}
        if service:
            params["service"] = service
        headers = {}
        if creds is not None and creds.username:
            headers["Authorization"] = creds.basic()
        httpx = self._httpx
        verify = not self.insecure(httpx.URL(realm).netloc.decode())
        client = self._client(httpx.URL(realm).netloc.decode(), verify)
        last: Exception | None = None
        for attempt in range(self.config.retries + 1):
            try:
                if creds is not None and creds.identity_token:
                    resp = client.post(realm, data={"grant_type": "refresh_token",
                                       "refresh_token": creds.identity_token, "service": service,
                                       "scope": scope, "client_id": "tlimage"})  # fmt: skip
                else:
                    resp = client.get(realm + ("&" if "?" in realm else "?") + urlencode(params),
                                      headers=headers)  # fmt: skip
            except httpx.TransportError as e:
                last = e
                time.sleep(self._backoff(attempt + 1))
                continue
            if resp.status_code in _RETRY_STATUS:
                last = OCIError(f"token server answered {resp.status_code}")
                time.sleep(self._retry_after(resp) or self._backoff(attempt + 1))
                continue
            if resp.status_code != 200:
                tried = creds.source if creds else "none (anonymous)"
                raise OCIError(
                    f"{ref or ep}: the token server {realm} refused access to {scope or ep.host} "
                    f"({resp.status_code}); credentials tried: {tried}"
                    f"{_error_text(resp.content)}", ref=ref or None,
                    hint="log in (~/.docker/config.json, $REGISTRY_AUTH_FILE or --registry-auth "
                    "FILE), or check the repository name",
                )  # fmt: skip
            try:
                doc = resp.json()
                token = doc.get("token") or doc.get("access_token")
            except ValueError:
                token = None
            if not token:
                raise OCIError(f"{ref or ep}: the token server {realm} answered without a token")
            self._tokens.put(key, token, float(doc.get("expires_in") or 60))
            return token
        raise OCIError(f"{ref or ep}: cannot get a token from {realm}: {last}", ref=ref or None)

    # -- manifests --------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, selector: str | None = None, *,
                     label: str | None = None) -> tuple[Fetched, Endpoint]:  # fmt: skip
        """The manifest (or index) `selector` (default: the reference's digest or tag) names,
        from the first endpoint that has it. Verified against the digest when one was asked
        for; refused over 4 MiB."""
        selector = selector or ref.selector
        label = label or ref.familiar()
        errors: list[str] = []
        for ep in self.endpoints(ref):
            try:
                got = self._get_manifest(ep, selector, label)
            except OCIError as e:
                if ep.mirror_of is None:
                    raise
                errors.append(f"mirror {ep.host}: {e.message}")
                continue
            if got is not None:
                return got, ep
            errors.append(f"{ep.host}: not found")
        what = "digest" if selector.startswith("sha256:") else "tag"
        raise OCIError(
            f"{label}: unknown image or {what} {selector!r} in {ref.name} "
            f"({'; '.join(errors)})", ref=label,
            hint="check the name and tag (`skopeo list-tags docker://…` lists tags)",
        )  # fmt: skip

    def _get_manifest(self, ep: Endpoint, selector: str, label: str) -> tuple[Fetched] | Any:
        resp = self.request("GET", ep, f"{ep.repository}/manifests/{selector}",
                            scope=f"repository:{ep.repository}:pull", headers={"Accept": ACCEPT},
                            stream=True, ref=label)  # fmt: skip
        try:
            if resp.status_code == 404:
                return None
            declared = resp.headers.get("content-length")
            if declared and int(declared) > MAX_MANIFEST:
                raise OCIError(f"{label}: manifest of {int(declared)} bytes is over the 4 MiB "
                               "limit; refused", ref=label)  # fmt: skip
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) > MAX_MANIFEST:
                    raise OCIError(f"{label}: manifest over the 4 MiB limit; refused", ref=label)
        except self._httpx.TransportError as e:
            raise self._net_error(ep, label, e) from None
        finally:
            resp.close()
        data = bytes(buf)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if selector.startswith("sha256:") and digest != selector:
            raise OCIError(f"{label}: manifest from {ep.host} has digest {digest}, not the "
                           f"{selector} asked for; refused", ref=label)  # fmt: skip
        header = resp.headers.get("docker-content-digest")
        if header and header.startswith("sha256:") and header != digest:
            raise OCIError(f"{label}: manifest from {ep.host} hashes to {digest} but the "
                           f"registry says {header}; refused", ref=label)  # fmt: skip
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        try:
            doc = json.loads(data)
            media = doc.get("mediaType") or media
        except ValueError:
            raise OCIError(f"{label}: the manifest from {ep.host} is not JSON", ref=label) from None
        return Fetched(data, media, digest)

    # -- blobs ------------------------------------------------------------------------------

    def open_blob(self, ep: Endpoint, digest: str, *, label: str) -> Any:
        """A streamed response for a blob (the caller closes it); OCIError if absent."""
        resp = self.request("GET", ep, f"{ep.repository}/blobs/{digest}",
                            scope=f"repository:{ep.repository}:pull", stream=True,
                            ref=label)  # fmt: skip
        if resp.status_code == 404:
            resp.close()
            raise OCIError(f"{label}: blob {digest} is missing from {ep}", ref=label)
        return resp

    def iter_blob(self, ep: Endpoint, digest: str, size: int, *, label: str,
                  on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:  # fmt: skip
        """The blob's bytes, verified against `digest` and `size` while they stream: more
        bytes than declared stop the download at once; a mismatch raises at the end. Transport
        failures mid-body raise `BlobInterrupted` (the caller restarts the blob).

        The body is read with `http.client` straight into 1 MiB buffers when the request needs
        nothing httpx is there for (see `_direct_get`): httpx/h11 copy every 64 KiB piece
        several times while holding the GIL, which made a pull of 50 MB from a local registry
        take 3x as long as the transfer itself. Anything else (an auth challenge, a retryable
        status, a proxy) goes through `request()`."""
        h = hashlib.sha256()
        seen = 0
        direct = self._direct_get(ep, digest, label)
        resp = direct[0] if direct else self.open_blob(ep, digest, label=label)
        try:
            try:
                for chunk in (self._direct_chunks(direct[0], size + 1) if direct
                              else resp.iter_raw(CHUNK)):  # fmt: skip
                    seen += len(chunk)
                    if seen > size:
                        raise OCIError(f"{label}: blob {digest} is larger than its declared "
                                       f"{size} bytes; refused", ref=label)  # fmt: skip
                    h.update(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                    yield chunk
            except (self._httpx.TransportError, OSError, http.client.HTTPException) as e:
                raise BlobInterrupted(
                    f"{label}: download of {digest} from {ep.host} broke off "
                    f"after {seen} of {size} bytes: {e}",
                    ref=label,
                ) from None
        finally:
            if direct:
                self._direct_release(*direct)
            else:
                resp.close()
        if seen != size:
            raise BlobInterrupted(f"{label}: blob {digest} from {ep.host} ended after {seen} of "
                                  f"{size} bytes", ref=label)  # fmt: skip
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            raise OCIError(f"{label}: blob from {ep.host} hashes to {actual}, not {digest}; "
                           "nothing was stored", ref=label)  # fmt: skip

    # -- blob bodies over http.client -------------------------------------------------------

    def _direct_get(self, ep: Endpoint, digest: str,
                    label: str) -> tuple[Any, Any, tuple[str, str]] | None:  # fmt: skip
        """A 200 response to GET of the blob over a pooled `http.client` connection, following
        redirects (to blob storage: the Authorization header is not sent to another host);
        None when the request is better made by `request()`: a proxy is configured, or the
        answer is anything but a 200 or a redirect (401, 404, 429, 5xx), or the connection
        fails (`request()` retries and reports)."""
        import urllib.request
        from urllib.parse import urlsplit

        scope = f"repository:{ep.repository}:pull"
        scheme = self._schemes.get(ep.host, "https")
        url = f"{scheme}://{ep.host}/v2/{ep.repository}/blobs/{digest}"
        headers = {"User-Agent": "tlimage", "Accept-Encoding": "identity"}
        if answer := self._answers.get((ep.host, scope)):
            headers["Authorization"] = answer
        proxies = urllib.request.getproxies_environment()
        for _hop in range(6):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return None
            host = parts.netloc.rpartition("@")[2]
            if parts.scheme in proxies and not urllib.request.proxy_bypass_environment(host):
                return None
            key = (parts.scheme, host)
            conn = self._direct_conn(key)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException, ssl.SSLError):
                conn.close()
                return None
            if resp.status == 200:
                return resp, conn, key
            location = resp.getheader("location")
            try:
                resp.read(65536)
            except (OSError, http.client.HTTPException):
                pass
            self._direct_release(resp, conn, key)
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return None
            url = urljoin(url, location)
            if urlsplit(url).netloc != parts.netloc:
                headers.pop("Authorization", None)
        return None

    def _direct_conn(self, key: tuple[str, str]) -> Any:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if idle:
                return idle.pop()
        scheme, host = key
        if scheme == "http":
            return http.client.HTTPConnection(host, timeout=self.config.timeout)
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.insecure(host) or self.insecure(name):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = self._ssl_context(host)
        return http.client.HTTPSConnection(host, timeout=self.config.timeout, context=ctx)

    def _direct_release(self, resp: Any, conn: Any, key: tuple[str, str]) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        if resp.isclosed() and not resp.will_close:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if len(idle) < 16:
                    idle.append(conn)
                    return
        resp.close()
        conn.close()

    @staticmethod
    def _direct_chunks(resp: Any, limit: int) -> Iterator[bytearray]:
        """The body in 1 MiB pieces, read into fresh buffers (no further copies), at most
        `limit` bytes."""
        while limit > 0:
            buf = bytearray(min(CHUNK, limit))
            n = resp.readinto(buf)
            if not n:
                return
            limit -= n
            if n < len(buf):
                del buf[n:]
            yield buf

    def get_blob_bytes(self, ep: Endpoint, digest: str, size: int, *, label: str,
                       limit: int = MAX_MANIFEST * 4) -> bytes:  # fmt: skip
        if size > limit:
            raise OCIError(f"{label}: blob {digest} of {size} bytes is over the limit of {limit}",
                           ref=label)  # fmt: skip
        for attempt in range(self.config.retries + 1):
            try:
                return b"".join(self.iter_blob(ep, digest, size, label=label))
            except BlobInterrupted:
                if attempt == self.config.retries:
                    raise
                time.sleep(self._backoff(attempt + 1))
        raise AssertionError("unreachable")

    def blob_exists(self, ep: Endpoint, digest: str, *, label: str, push: bool = False) -> bool:
        action = "pull,push" if push else "pull"
        resp = self.request("HEAD", ep, f"{ep.repository}/blobs/{digest}",
                            scope=f"repository:{ep.repository}:{action}", ref=label)  # fmt: skip
        return resp.status_code == 200

    # -- uploads ----------------------------------------------------------------------------

    def mount_blob(self, ep: Endpoint, digest: str, from_repo: str, *, label: str) -> str | None:
        """Cross-repository mount: None when mounted, else the upload URL the registry opened
        instead."""
        q = urlencode({"mount": digest, "from": from_repo})
        scope = f"repository:{ep.repository}:pull,push"
        resp = self.request("POST", ep, f"{ep.repository}/blobs/uploads/?{q}", scope=scope,
                            ok=(201, 202), ref=label,
                            headers={"Content-Length": "0"})  # fmt: skip
        if resp.status_code == 201:
            return None
        return self._location(ep, resp, label)

    def start_upload(self, ep: Endpoint, *, label: str) -> str:
        resp = self.request("POST", ep, f"{ep.repository}/blobs/uploads/",
                            scope=f"repository:{ep.repository}:pull,push", ok=(202,), ref=label,
                            headers={"Content-Length": "0"})  # fmt: skip
        if resp.status_code == 404:
            raise OCIError(f"{label}: {ep.host} refused to start an upload (404)", ref=label)
        return self._location(ep, resp, label)

    def _location(self, ep: Endpoint, resp: Any, label: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise OCIError(f"{label}: {ep.host} opened an upload without a Location", ref=label)
        return urljoin(str(resp.url), loc)

    def upload_blob(self, ep: Endpoint, digest: str, size: int,
                    chunks: Callable[[], Iterator[bytes]], *, label: str,
                    chunk_size: int | None = None, url: str | None = None) -> None:  # fmt: skip
        """Upload a blob: monolithic (one PUT) by default, or in PATCH chunks of `chunk_size`
        bytes. `chunks` makes the byte stream afresh for each attempt. `url`: an upload the
        registry opened already (a mount it answered with a plain upload), used first."""
        scope = f"repository:{ep.repository}:pull,push"
        opened = url
        for attempt in range(self.config.retries + 1):
            url, opened = opened or self.start_upload(ep, label=label), None
            try:
                if chunk_size:
                    url = self._patch_chunks(ep, url, chunks, chunk_size, scope, label)
                    body: Callable[[], Any] = _empty
                    length = 0
                else:
                    body, length = chunks, size
                sep = "&" if "?" in url else "?"
                resp = self.request(
                    "PUT", ep, "", url=f"{url}{sep}{urlencode({'digest': digest})}",
                    scope=scope, ok=(201, 204), ref=label, content=body,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(length)},
                )  # fmt: skip
                if resp.status_code == 404:
                    raise BlobInterrupted(f"{label}: upload of {digest} vanished", ref=label)
                return
            except BlobInterrupted:
                if attempt == self.config.retries:
                    raise
                time.sleep(self._backoff(attempt + 1))

    def _patch_chunks(self, ep: Endpoint, url: str, chunks: Callable[[], Iterator[bytes]],
                      chunk_size: int, scope: str, label: str) -> str:  # fmt: skip
        offset = 0
        buf = bytearray()

        def send(data: bytes) -> str:
            nonlocal offset
            resp = self.request("PATCH", ep, "", url=url, scope=scope, ok=(202,), ref=label,
                                content=lambda: data, headers={
                                    "Content-Type": "application/octet-stream",
                                    "Content-Length": str(len(data)),
                                    "Content-Range": f"{offset}-{offset + len(data) - 1}"})  # fmt: skip
            if resp.status_code == 404:
                raise BlobInterrupted(f"{label}: upload session vanished", ref=label)
            offset += len(data)
            return self._location(ep, resp, label)

        for chunk in chunks():
            buf += chunk
            while len(buf) >= chunk_size:
                url = send(bytes(buf[:chunk_size]))
                del buf[:chunk_size]
        if buf:
            url = send(bytes(buf))
        return url

    def put_manifest(self, ep: Endpoint, reference: str, data: bytes, media_type: str, *,
                     label: str) -> str:  # fmt: skip
        resp = self.request("PUT", ep, f"{ep.repository}/manifests/{reference}",
                            scope=f"repository:{ep.repository}:pull,push", ok=(201, 200),
                            content=lambda: data, ref=label,
                            headers={"Content-Type": media_type})  # fmt: skip
        if resp.status_code == 404:
            raise OCIError(f"{label}: {ep.host} refused the manifest (404){_error_text(resp.content)}",
                           ref=label)  # fmt: skip
        return resp.headers.get("docker-content-digest") or (
            "sha256:" + hashlib.sha256(data).hexdigest()
        )


class BlobInterrupted(OCIError):
    """A blob transfer broke off part way; it can be retried from the start."""


def _unresolvable(e: Exception) -> bool:
    text = str(e)
    return any(m in text for m in ("Name or service not known", "No address associated",
                                   "Temporary failure in name resolution",
                                   "nodename nor servname"))  # fmt: skip


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _empty() -> bytes:
    return b""


def _read_small(resp: Any) -> bytes:
    try:
        data = resp.read()[:4096]
    except Exception:  # noqa: BLE001 - best effort, for the error message only
        data = b""
    resp.close()
    return data


def _reason(resp: Any) -> str:
    return getattr(resp, "reason_phrase", "") or ""


def _error_text(body: bytes) -> str:
    """The registry's `{"errors": [{"code", "message"}]}`, as text."""
    try:
        doc = json.loads(body)
        errs = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                for e in doc.get("errors", [])]  # fmt: skip
    except (ValueError, AttributeError, TypeError):
        return ""
    return (" — " + "; ".join(errs)) if errs else ""


def docker_hub(ref: Reference) -> bool:
    return ref.registry == DOCKER_HUB
