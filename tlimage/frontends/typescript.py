"""The TypeScript front end: `image.ts` / `.mts` / `.mjs` / `.js` through Node to JSON, then IR.

Node runs the SDK's exporter (`sdk/typescript/bin/tlimage-export.js`), which imports the file
and writes the JSON image document of the images it exports, each operation with the source
place of the call that made it. That document goes through the JSON front end, so the schema,
the errors and the lowering are the JSON ones, with errors and step spans pointing at the
TypeScript lines.

The SDK is found in the repository (`sdk/typescript/`), inside an installed wheel
(`tlimage/_sdk/typescript/`), or where `TLIMAGE_TS_SDK` says. `.ts` files need the
`typescript` npm package next to the image file or in the SDK folder (`npm ci` there), unless
Node strips types itself; the exporter says so when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tlimage import ir
from tlimage.errors import DiscoveryError, TlimageError
from tlimage.source import Span

# An image file may do real work while loading (read files, compute versions); this bounds a
# file that hangs, not one that is slow.
EXPORT_TIMEOUT_S = 120.0

_HERE = Path(__file__).resolve().parent


def sdk_dir() -> Path:
    """The TypeScript SDK's folder (the one holding `bin/tlimage-export.js`)."""
    env = os.environ.get("TLIMAGE_TS_SDK")
    candidates = [Path(env)] if env else []
    candidates += [_HERE.parent / "_sdk" / "typescript", _HERE.parents[1] / "sdk" / "typescript"]
    for c in candidates:
        if (c / "bin" / "tlimage-export.js").is_file():
            return c
    raise TlimageError(
        "the TypeScript SDK is missing from this installation "
        f"(looked in: {', '.join(str(c) for c in candidates)})",
        hint="set TLIMAGE_TS_SDK to the folder of @tlimage/sdk",
    )


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise TlimageError(
            "running a TypeScript/JavaScript image file needs Node.js >= 20.6, and `node` is "
            "not on PATH",
            hint="install it (Debian/Ubuntu: apt-get install nodejs), or export the image to "
            "JSON elsewhere and build the .json file",
        )
    return node


def export_json(path: Path) -> str:
    """The JSON image document of the images `path` exports (with source places)."""
    node = node_binary()
    exporter = sdk_dir() / "bin" / "tlimage-export.js"
    with tempfile.TemporaryDirectory(prefix="tlimage-ts-") as tmp:
        out = Path(tmp) / "images.json"
        cmd = [node, "--enable-source-maps", str(exporter), "--sources", "--compact",
               "--out", str(out), str(path.resolve())]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise DiscoveryError(
                f"{path}: loading the file took longer than {EXPORT_TIMEOUT_S:.0f} s"
            ) from None
        if proc.returncode == 2:
            raise DiscoveryError(_user_error(proc.stderr, path)) from None
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise TlimageError(f"{path}: exporting the images with Node failed "
                               f"(exit {proc.returncode}):\n{tail}")  # fmt: skip
        return out.read_text(encoding="utf-8")


def load_typescript_images(path: str | Path) -> list[ir.ImageDef]:
    """All images `path` exports, lowered through the JSON front end."""
    from tlimage.frontends.jsonform import load_json_text

    p = Path(path)
    return load_json_text(export_json(p), str(p), in_text=False)


_PLACE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$", re.DOTALL)


def _user_error(stderr: str, path: Path) -> str:
    """The exporter's one message, with its place made relative and the line shown."""
    text = stderr.strip()
    m = _PLACE.match(text)
    if not m:
        return text.replace(str(path.resolve()), str(path)) if text else f"{path}: export failed"
    file = _display_path(m["file"], path)
    span = Span(file, int(m["line"]), int(m["col"]))
    return span.render(m["msg"].strip(), read_text(m["file"]))


def read_text(file: str) -> str | None:
    """A source file's text as it is now (not a cached copy), or None when unreadable."""
    try:
        return Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _display_path(file: str, path: Path) -> str:
    if file == str(path.resolve()):
        return str(path)
    cwd = os.getcwd()
    return os.path.relpath(file, cwd) if file.startswith(cwd + os.sep) else file
