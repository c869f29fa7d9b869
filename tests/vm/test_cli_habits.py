"""`tl sbx image create` with Docker's habits, end to end on the busybox base through the
namespace backend: PATH as a folder or a file, -f with any name or from stdin, the context is
never the parent folder, -t/-n NAME[:TAG]."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace backend needs root"),
    pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                       reason="busybox-static is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

DOCKERFILE = "FROM busybox\nCOPY hello.txt /hello.txt\nRUN cat /hello.txt\n"


def tl(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, input=stdin)  # fmt: skip


def registered(cwd: Path) -> set[str]:
    out = tl("sbx", "image", "ls", "--json", cwd=cwd)
    return {f"{r['name']}:{r['tag']}" for r in map(json.loads, out.stdout.splitlines())}


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    # The parent holds a decoy: a build whose context were the parent would copy it.
    (tmp_path / "hello.txt").write_text("from the parent: wrong context\n")
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.txt").write_text("from the context\n")
    return app


def build(*args: str, cwd: Path, stdin: str | None = None) -> list[dict]:
    out = tl("sbx", "image", "create", "--isolation", "namespace", "--progress", "json", "--no-cache",
             *args,
             cwd=cwd, stdin=stdin)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    logs = "".join(e.get("data", "") for e in events if e["event"] == "build_log")
    assert "from the context" in logs
    return events


def test_folder_path_file_path_and_tags(ctx: Path) -> None:
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    build(".", "-n", "foo:v1", cwd=ctx)
    build("Dockerfile", "-t", "bar:v2", "-t", "baz", cwd=ctx)
    build(str(ctx), "--name", "qux", cwd=ctx.parent)
    assert {"foo:v1", "bar:v2", "baz:latest", "qux:latest"} <= registered(ctx)


def test_dash_f_any_name_and_stdin(ctx: Path) -> None:
    (ctx / "build.docker").write_text(DOCKERFILE)
    build("-f", "build.docker", "-t", "named:1", cwd=ctx)  # context: the file's folder
    build("-f", str(ctx / "build.docker"), str(ctx), "-t", "named:2", cwd=ctx.parent)
    build("-f", "-", ".", "-t", "stdin:1", cwd=ctx, stdin=DOCKERFILE)
    assert {"named:1", "named:2", "stdin:1"} <= registered(ctx)


def test_json_alias_and_plain_progress(ctx: Path) -> None:
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    out = tl("sbx", "image", "create", ".", "--isolation", "namespace", "--json", cwd=ctx)
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["event"] == "done"
    plain = tl("sbx", "image", "create", ".", "--backend", "namespace", "--progress", "plain",
               cwd=ctx)  # fmt: skip
    assert plain.returncode == 0 and "CACHED" in plain.stderr and "\x1b[" not in plain.stderr


def test_a_name_from_another_source_needs_replace(ctx: Path, tmp_path: Path) -> None:
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    other = tmp_path / "other"
    other.mkdir()
    (other / "hello.txt").write_text("from the context\n")
    (other / "Dockerfile").write_text(DOCKERFILE + "RUN true\n")
    build(".", "-n", "shared:v1", cwd=ctx)
    build(".", "-n", "shared:v1", cwd=ctx)  # the same file again: updates it
    taken = tl("sbx", "image", "create", ".", "--isolation", "namespace", "-n", "shared:v1",
               cwd=other)  # fmt: skip
    assert taken.returncode == 2 and "--replace" in taken.stderr, taken.stderr
    assert "holds an image from" in taken.stderr and "Traceback" not in taken.stderr
    build(".", "-n", "shared:v1", "--replace", cwd=other)


def test_dash_i_means_interactive_and_the_old_image_spelling_still_works(ctx: Path) -> None:
    # One meaning of -i across commands (docker's: interactive); `-i IMAGE` of `image create`
    # and `new` keeps working with a deprecation notice, `--image-name`/`--image` without one.
    (ctx / "image.py").write_text(
        "from tlimage import Image\n"
        "api = Image('api', base_image='busybox').copy('hello.txt', '/h').run('cat /h')\n"
        "worker = Image('worker', base_image='busybox').copy('hello.txt', '/w').run('cat /w')\n"
    )
    events = build("image.py", "--image-name", "worker", cwd=ctx)
    assert [e["name"] for e in events if e["event"] == "image_registered"][:1] == ["worker"]
    old = tl("sbx", "image", "create", "image.py", "-i", "api", "--isolation", "namespace",
             cwd=ctx)  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert "`tl sbx image create -i NAME` is deprecated" in old.stderr
    assert {"worker:latest", "api:latest"} <= registered(ctx)

    new = tl("sbx", "new", "-i", "api", "--isolation", "namespace", "--timeout", "120", cwd=ctx)
    assert new.returncode == 0, new.stderr
    assert "`tl sbx new -i NAME` is deprecated" in new.stderr and "use --image NAME" in new.stderr
    sid = new.stdout.strip()
    try:
        piped = tl("sbx", "exec", "-i", sid, "tr", "a-z", "A-Z", cwd=ctx, stdin="shout\n")
        assert (piped.returncode, piped.stdout) == (0, "SHOUT\n"), piped.stderr
        closed = tl("sbx", "exec", sid, "cat", cwd=ctx, stdin="not passed\n")  # no -i: no stdin
        assert (closed.returncode, closed.stdout) == (0, ""), closed.stderr
    finally:
        tl("sbx", "terminate", sid, cwd=ctx)
