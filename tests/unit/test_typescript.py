"""The TypeScript front end and SDK: the SDK's own Node test suite, and image files loaded
through Node into IR. Skipped only when `node` is not installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tlimage import Image, ir
from tlimage.errors import DiscoveryError, JSONFormError, TlimageError
from tlimage.frontends import load
from tlimage.frontends.typescript import export_json, sdk_dir

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not installed (apt-get install nodejs)"
)


def _typescript_available() -> bool:
    if NODE is None:
        return False
    probe = ("try{require.resolve('typescript');process.exit(0)}catch{"
             "process.exit(process.features.typescript?0:1)}")  # fmt: skip
    return subprocess.run([NODE, "-e", probe], cwd=sdk_dir(), check=False).returncode == 0


needs_typescript = pytest.mark.skipif(
    not _typescript_available(),
    reason="the typescript npm package is not installed: run `npm ci` in sdk/typescript",
)


@needs_node
def test_sdk_node_test_suite_passes() -> None:
    sdk = sdk_dir()
    files = sorted(str(p.relative_to(sdk)) for p in (sdk / "test").glob("*.test.js"))
    assert files, "no Node tests found"
    proc = subprocess.run([NODE, "--test", *files], cwd=sdk, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    counts = dict(re.findall(r"^# (tests|pass|fail|skipped) (\d+)$", proc.stdout, re.M))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert counts.get("fail") == "0" and int(counts.get("pass", 0)) >= 15, counts


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@needs_node
def test_mjs_image_is_the_dsl_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(
        tmp_path,
        "image.mjs",
        """import { Image } from "@tlimage/sdk";

export default new Image({ name: "svc", baseImage: "ubuntu-minimal" })
  .aptInstall("curl", "git")
  .pipInstall(["pandas==2.2.*"], { pre: true })
  .run(["mkdir -p /w", "cd /w"], { env: { A: 1 }, force: true })
  .copy("app/", "/srv/", { chmod: 0o755 })
  .expose(8080, "53/udp")
  .healthcheck("curl -f localhost", { interval: 30, retries: 3 })
  .cmd(["python3", "-m", "svc"]);
""",
    )
    [got] = load("image.mjs")
    want = (
        Image("svc", base_image="ubuntu-minimal")
        .apt_install("curl", "git")
        .pip_install(["pandas==2.2.*"], pre=True)
        .run(["mkdir -p /w", "cd /w"], options={"env": {"A": 1}, "force": True})
        .copy("app/", "/srv/", options={"chmod": 0o755})
        .expose(8080, "53/udp")
        .healthcheck("curl -f localhost", interval=30, retries=3)
        .cmd(["python3", "-m", "svc"])
        .to_ir()
    )
    assert got.digest() == want.digest()
    assert got.target_stage.steps == want.target_stage.steps
    metas = got.target_stage.meta
    assert [str(m.span) for m in metas[:3]] == ["image.mjs:3:16", "image.mjs:4:4", "image.mjs:5:4"]
    assert [m.force for m in metas] == [False, False, False, True, False, False, False, False]


@needs_node
@needs_typescript
def test_ts_image_with_types_and_a_local_import(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    _write(
        tmp_path,
        "base.ts",
        """import { Image } from "@tlimage/sdk";
export interface Options { port: number }
export const base = (o: Options): Image =>
  new Image({ name: "api" }).expose(o.port);
""",
    )
    _write(
        tmp_path,
        "image.ts",
        """import { base } from "./base.js";
const port: number = 8080;

export const api = base({ port })
  .cmd(["node", "server.js"]);
""",
    )
    [img] = load("image.ts")
    assert img.name == "api"
    assert img.target_stage.steps[1:] == (ir.Expose(ports=("8080/tcp",)),
                                          ir.Cmd(command=("node", "server.js")))  # fmt: skip
    assert [str(m.span) for m in img.target_stage.meta] == ["base.ts:4:3", "base.ts:4:30",
                                                            "image.ts:5:4"]  # fmt: skip


@needs_node
def test_schema_errors_point_at_the_typescript_line(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    _write(
        tmp_path,
        "image.mjs",
        """import { Image } from "@tlimage/sdk";

export default new Image({ name: "x" })
  .run("make")
  .env("APP ENV", "prod");
""",
    )
    with pytest.raises(JSONFormError) as info:
        load("image.mjs")
    assert info.value.render() == (
        'image.mjs:5:4: images[0].operations[1].args[0]: "APP ENV" is not allowed: a variable '
        "name: no '=' or whitespace\n"
        '   5 |   .env("APP ENV", "prod");\n'
        "          ^"
    )


@needs_node
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("export const n = 1;\n", "image.mjs: exports no image; export one"),
        (
            'import { Image } from "@tlimage/sdk";\nconst s = {};\n'
            'export default new Image().env("K", s.k.trim());\n',
            "image.mjs:3:41: loading the file raised TypeError: Cannot read properties of undefined",
        ),
        (
            'import { Image } from "@tlimage/sdk";\nexport default new Image()\n'
            '  .copy("a", "/b", { keepGitDir: true });\n',
            'image.mjs:3:4: copy(): unknown option "keepGitDir"; allowed: chmod, chown, exclude',
        ),
        ("export default [1,;\n", "image.mjs:1:19: invalid JavaScript: Unexpected token"),
    ],
    ids=["no-image", "throws", "wrong-call", "syntax"],
)
def test_file_errors_are_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 source: str, expected: str) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "image.mjs", source)
    with pytest.raises(DiscoveryError) as info:
        load("image.mjs")
    assert info.value.render().startswith(expected)


def test_missing_node_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "image.mjs", "export default 1;\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TlimageError) as info:
        load(tmp_path / "image.mjs")
    assert "needs Node.js" in info.value.message
    assert "apt-get install nodejs" in (info.value.hint or "")


@needs_node
@needs_typescript
def test_exported_documents_are_valid_for_jsonschema() -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema (test extra) is not installed"
    )
    from tlimage.frontends import jsonform

    check = jsonschema.Draft202012Validator(jsonform.schema())
    files = sorted((FIXTURES / "equivalent").glob("*/image.ts"))
    files.append(sdk_dir() / "test" / "modules" / "several.mjs")
    for path in files:
        doc = json.loads(export_json(path))
        assert [e.message for e in check.iter_errors(doc)] == [], path


TS_IMAGE = """\
import { Image } from "@tlimage/sdk";

export default new Image({ name: "ts-hello", baseImage: "busybox" })
  .run(["mkdir -p /w", "echo hi > /w/x"])
  .copy("app/", "/srv/app/")
  .env("APP_ENV", "prod")
  .workdir("/srv/app")
  .run("cat greeting.txt")
  .cmd(["cat", "/srv/app/greeting.txt"]);
"""


@needs_node
@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root")
@pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                    reason="busybox-static is not installed (scripts/setup.sh installs it)")  # fmt: skip
def test_json_exported_by_the_sdk_builds_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "greeting.txt").write_text("hello from TypeScript\n")
    (tmp_path / "image.mjs").write_text(TS_IMAGE)
    exporter = sdk_dir() / "bin" / "tlimage-export.js"
    doc = subprocess.run([NODE, str(exporter), "image.mjs"], cwd=tmp_path, capture_output=True,
                         text=True, check=True, timeout=120).stdout  # fmt: skip
    (tmp_path / "image.json").write_text(doc)

    def tl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    built = tl("sbx", "image", "create", "image.json", "--isolation", "namespace")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "registered ts-hello:latest" in built.stdout + built.stderr
    described = tl("sbx", "image", "describe", "ts-hello")
    assert described.returncode == 0, described.stderr
    info = json.loads(described.stdout)
    assert info["config"]["cmd"] == ["cat", "/srv/app/greeting.txt"]
    assert "APP_ENV=prod" in info["config"]["env"]
    # The JSON file and the module it came from are the same image.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert info["ir_digest"] == load("image.json")[0].digest() == load("image.mjs")[0].digest()
