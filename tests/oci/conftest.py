"""Real registries for the OCI tests: Debian's `docker-registry` (CNCF distribution) started on
127.0.0.1 with a free port — plain HTTP, TLS with a CA made here by `openssl` plus htpasswd basic
auth, or distribution's `token` auth with a small token issuer in this process signing JWTs
with a test key. Images are put in with `umoci` + `skopeo copy`, as another toolchain would."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None and not Path(t).exists():
            pytest.skip(f"{t} is not installed (scripts/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reg:
    host: str
    root: Path
    proc: subprocess.Popen | None
    config: Path
    scheme: str = "http"
    ca: Path | None = None
    certs_dir: Path | None = None
    user: str | None = None
    password: str | None = None
    auth_file: Path | None = None
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start(self) -> None:
        self.proc = _launch(self.config, self.host, self.root, self.scheme)

    def skopeo_flags(self, side: str) -> list[str]:
        """`--dest-*`/`--src-*` flags for skopeo to reach this registry."""
        out = []
        if self.scheme == "http":
            out.append(f"--{side}-tls-verify=false")
        elif self.certs_dir:
            out.append(f"--{side}-cert-dir={self.certs_dir / self.host}")
        if self.user:
            out.append(f"--{side}-creds={self.user}:{self.password}")
        return out


def _launch(config: Path, host: str, root: Path, scheme: str) -> subprocess.Popen:
    log = open(root / "registry.log", "ab")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})  # fmt: skip
    port = int(host.rsplit(":", 1)[1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("docker-registry did not listen")


def _config(root: Path, port: int, *, tls: tuple[Path, Path] | None = None,
            auth: str = "") -> Path:  # fmt: skip
    text = f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: test-secret
"""
    if tls:
        text += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    text += auth
    path = root / "config.yml"
    path.write_text(text)
    return path


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1/localhost, made with openssl."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def registry(tmp_path: Path):
    """A plain-HTTP registry; tlimage reaches it as an --insecure-registry host."""
    need(REGISTRY_BIN)
    port = free_port()
    root = tmp_path / "registry"
    root.mkdir()
    reg = Reg(f"127.0.0.1:{port}", root, None, _config(root, port))
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture
def tls_registry(tmp_path: Path):
    """TLS with a CA made by the test, and htpasswd basic auth (user `alice`)."""
    need(REGISTRY_BIN, "htpasswd", "openssl")
    port = free_port()
    root = tmp_path / "tlsreg"
    root.mkdir()
    ca, cert, key = make_ca(root / "pki")
    htpasswd = root / "htpasswd"
    out = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], check=True,
                         capture_output=True).stdout  # fmt: skip
    htpasswd.write_bytes(out)
    auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n"
    host = f"127.0.0.1:{port}"
    certs = root / "certs.d"
    (certs / host).mkdir(parents=True)
    shutil.copy(ca, certs / host / "ca.crt")
    auth_file = root / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}})
    )
    reg = Reg(
        host,
        root,
        None,
        _config(root, port, tls=(cert, key), auth=auth),
        scheme="https",
        ca=ca,
        certs_dir=certs,
        user="alice",
        password="s3cret",
        auth_file=auth_file,
    )
    reg.start()
    yield reg
    reg.stop()


class _TokenIssuer:
    """A token server as Docker Hub's: anonymous callers may pull `public/*`; `bob:pw` may pull
    and push anything. Tokens are RS256 JWTs whose x5c header carries the signing certificate,
    which the registry trusts (`rootcertbundle`)."""

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token issuer")])
        now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - __import__("datetime").timedelta(hours=1))
                .not_valid_after(now + __import__("datetime").timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))  # fmt: skip
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = root / "token.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict] = []
        self.port = free_port()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # noqa: ANN002
                pass

            def do_GET(self):  # noqa: N802
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                user = None
                hdr = self.headers.get("Authorization", "")
                if hdr.startswith("Basic "):
                    u, _, p = base64.b64decode(hdr[6:]).decode().partition(":")
                    if (u, p) != ("bob", "pw"):
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = q.get("scope", [])
                issuer.requests.append(
                    {"user": user, "scope": scopes, "service": q.get("service", [""])[0]}
                )
                access = []
                for sc in scopes:
                    typ, name, actions = sc.split(":")
                    allowed = [
                        a
                        for a in actions.split(",")
                        if user or (a == "pull" and name.startswith("public/"))
                    ]
                    access.append({"type": typ, "name": name, "actions": allowed})
                body = json.dumps(
                    {"token": issuer.sign(user or "", access), "expires_in": 300}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, sub: str, access: list) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        now = int(time.time())
        claims = {
            "iss": "test-issuer",
            "sub": sub,
            "aud": "test-registry",
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(sig)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_registry(tmp_path: Path):
    """Plain HTTP registry with distribution's `token` auth and the issuer above."""
    need(REGISTRY_BIN)
    pytest.importorskip("cryptography")
    root = tmp_path / "tokreg"
    root.mkdir()
    issuer = _TokenIssuer(root)
    port = free_port()
    auth = (f"auth:\n  token:\n    realm: http://127.0.0.1:{issuer.port}/token\n"
            f"    service: test-registry\n    issuer: test-issuer\n"
            f"    rootcertbundle: {issuer.bundle}\n")  # fmt: skip
    host = f"127.0.0.1:{port}"
    auth_file = root / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"bob:pw").decode()}}})
    )
    reg = Reg(
        host,
        root,
        None,
        _config(root, port, auth=auth),
        user="bob",
        password="pw",
        auth_file=auth_file,
        extra={"issuer": issuer},
    )
    reg.start()
    yield reg
    reg.stop()
    issuer.close()


# -- images made by other tools -------------------------------------------------------------------


def umoci_image(layout: Path, tag: str, layers: list[dict[str, object]],
                config: list[str] = ()) -> Path:  # fmt: skip
    """An OCI layout made by umoci: each layer a dict path -> bytes (a file), "dir/" (folder),
    ("symlink", target), or None (delete: a whiteout). Returns the layout folder."""
    need("umoci")
    work = layout.parent / f"bundle-{tag}"
    if not layout.exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
        subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
    else:
        subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
    for layer in layers:
        if work.exists():
            shutil.rmtree(work)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(work)], check=True,
                       capture_output=True)  # fmt: skip
        rootfs = work / "rootfs"
        for path, content in layer.items():
            p = rootfs / path.rstrip("/")
            if content is None:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            if path.endswith("/"):
                p.mkdir(exist_ok=True)
            elif isinstance(content, tuple):
                os.symlink(content[1], p)
            else:
                p.write_bytes(content)  # type: ignore[arg-type]
        subprocess.run(["umoci", "repack", "--image", f"{layout}:{tag}", str(work)], check=True,
                       capture_output=True)  # fmt: skip
    if config:
        subprocess.run(["umoci", "config", "--image", f"{layout}:{tag}", *config], check=True)
    shutil.rmtree(work, ignore_errors=True)
    return layout


# -- images made by hand (what no tool writes: a config that lies, a layer of many frames) -----


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def one_file_tar(name: str, data: bytes) -> bytes:
    """A pax tar holding one file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def put_image(reg: Reg, ref: str, blob: bytes, media_type: str, diff_id: str,
              config: dict | None = None) -> None:  # fmt: skip
    """Upload to the plain-HTTP registry `reg`, as `ref`, a one-layer image made by hand: the
    layer `blob` (of `media_type`) and an image config (`config` its "config" part) that says
    the layer unpacks to `diff_id` — right or not, as the test wants."""
    from tlimage.oci.client import OCI_CONFIG, OCI_MANIFEST, RegistryClient, RegistryConfig
    from tlimage.oci.reference import parse

    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config or {},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(cfg), "size": len(cfg)},
        "layers": [{"mediaType": media_type, "digest": sha256(blob), "size": len(blob)}],
    }).encode()  # fmt: skip
    parsed = parse(ref)
    with RegistryClient(RegistryConfig(insecure=(reg.host,), certs_dirs=())) as c:
        ep = c.endpoints(parsed, write=True)[0]
        for b in (blob, cfg):
            c.upload_blob(ep, sha256(b), len(b), lambda b=b: iter([b]), label=ref)
        c.put_manifest(ep, parsed.tag or "latest", manifest, OCI_MANIFEST, label=ref)


def skopeo_copy(src: str, dest: str, *flags: str) -> None:
    need("skopeo")
    proc = subprocess.run(["skopeo", "copy", "--quiet", *flags, src, dest], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# -- podman as a peer -----------------------------------------------------------------------------


@dataclass
class Podman:
    """A throw-away podman store (vfs) run by runc with cgroupfs and explicit ulimits, so that
    `podman run` works as root on hosts with hybrid cgroups and a low hard nofile limit."""

    base: list[str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc

    def run(self, image: str, *argv: str) -> str:
        return self("run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                    "--ulimit", "nproc=1024:1024", image, *argv).stdout  # fmt: skip


@pytest.fixture
def podman(tmp_path: Path):
    need("podman", "runc")
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="tlp-", dir="/tmp"))  # podman: runroot < 50 characters
    p = Podman(["podman", "--root", str(tmp_path / "podman-root"), "--runroot", str(run),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--runtime", "runc",
                "--events-backend", "none"])  # fmt: skip
    yield p
    p("rmi", "-a", "-f", check=False)
    shutil.rmtree(run, ignore_errors=True)
