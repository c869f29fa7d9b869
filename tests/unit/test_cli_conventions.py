"""CLI conventions a Docker user expects: names checked before anything runs, `--version`, `-h`,
shell completion, `--isolation` everywhere (`--backend` kept hidden), `tl sbx image bases`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def tl(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([sys.executable, "-m", "tlimage", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, input=stdin,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.parametrize("flag", ["-n", "--name", "--registered-name", "-t", "--tag"])
@pytest.mark.parametrize("ref", ["foo:v1:latest", "Bad Name", "-x", "foo:"])
def test_invalid_names_fail_before_any_step(tmp_path: Path, flag: str, ref: str) -> None:
    # The image file would fail loudly if anything were built: its base is unknown.
    (tmp_path / "Dockerfile").write_text("FROM no-such-base\nRUN exit 9\n")
    out = tl("sbx", "image", "create", ".", flag, ref, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Invalid value" in out.stderr and "no-such-base" not in out.stderr
    assert "Traceback" not in out.stderr


def test_version_and_short_help() -> None:
    out = tl("--version")
    assert out.returncode == 0 and out.stdout.startswith("tl ")
    assert out.stdout.split()[1][0].isdigit()
    for args in (("-h",), ("sbx", "-h"), ("sbx", "image", "create", "-h"), ("sbx", "new", "-h")):
        h = tl(*args)
        assert h.returncode == 0 and "Usage: tl" in h.stdout, args


def test_create_help_shows_docker_habits() -> None:
    text = tl("sbx", "image", "create", "-h").stdout
    for opt in (
        "-f, --file",
        "-t, --tag NAME[:TAG]",
        "--name",
        "--progress",
        "[auto|plain|tty|json]",
        "--isolation",
    ):
        assert opt in text, opt
    assert "--backend" not in text  # the old spelling still works, unlisted


def test_new_takes_isolation_and_hides_backend() -> None:
    text = tl("sbx", "new", "-h").stdout
    assert "--isolation" in text and "--backend" not in text
    assert "--cpus FLOAT" in text


def test_shell_completion() -> None:
    script = tl("--show-completion", "bash", env={"SHELL": "/usr/bin/zsh"})
    assert script.returncode == 0 and "_TL_COMPLETE=complete_bash" in script.stdout
    assert "compdef" not in script.stdout  # the shell asked for, not the one detected
    out = subprocess.run([sys.executable, "-m", "tlimage"], capture_output=True, text=True,
                         env={**os.environ, "_TL_COMPLETE": "complete_bash",
                              "COMP_WORDS": "tl sbx image cr", "COMP_CWORD": "3"},
                         timeout=60)  # fmt: skip
    assert out.stdout.split() == ["create"]
    bad = tl("--show-completion", "tcsh")
    assert bad.returncode == 2 and "one of bash, zsh" in bad.stderr


# Run by an orphan: its parent exits first, so it is adopted by init (or a subreaper) and has no
# shell among its ancestors, as under cron, `setsid -f` or a CI runner's background job.
# The orphan's exit status comes back as the last line of its stderr.
_ORPHAN = """
import os, subprocess, sys
parent = os.getpid()
if os.fork():
    os._exit(0)
os.setsid()
while os.getppid() == parent:
    pass
rc = subprocess.call(sys.argv[1:])
print(f"exit {rc}", file=sys.stderr)
"""


def orphan(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "SHELL"}
    out = subprocess.run([sys.executable, "-c", _ORPHAN, *argv], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, env={**base, **env}, timeout=60)  # fmt: skip
    err, _, last = out.stderr.rstrip("\n").rpartition("\n")
    assert last.startswith("exit "), out.stderr
    return subprocess.CompletedProcess(argv, int(last.split()[1]), out.stdout, err)


def test_shell_completion_without_a_parent_shell() -> None:
    probe = orphan(sys.executable, "-c", "import shellingham; print(shellingham.detect_shell())",
                   env={})  # fmt: skip
    if probe.returncode == 0:
        pytest.skip(f"a shell adopts orphans on this machine: {probe.stdout.strip()}")
    assert "ShellDetectionFailure" in probe.stderr
    named = orphan(sys.executable, "-m", "tlimage", "--show-completion", "bash", env={})
    assert named.returncode == 0, named.stderr
    assert "_TL_COMPLETE=complete_bash" in named.stdout
    from_env = orphan(sys.executable, "-m", "tlimage", "--show-completion",
                      env={"SHELL": "/bin/zsh"})  # fmt: skip
    assert from_env.returncode == 0 and "compdef tl" in from_env.stdout, from_env.stderr
    unknown = orphan(sys.executable, "-m", "tlimage", "--show-completion", env={})
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "tl --show-completion bash" in unknown.stderr
    install = orphan(sys.executable, "-m", "tlimage", "--install-completion", env={})
    assert install.returncode == 2 and "tl --install-completion bash" in install.stderr


def test_missing_image_file_in_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    out = tl("sbx", "image", "create", str(tmp_path))
    assert out.returncode == 2
    assert "no image file in this folder" in out.stderr and "-f FILE" in out.stderr


def test_bases_lists_the_catalog(tmp_path: Path) -> None:
    out = tl(
        "sbx",
        "image",
        "bases",
        "--json",
        env={"TLIMAGE_CACHE_DIR": str(tmp_path), "TLIMAGE_UBUNTU_MIRROR": ""},
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    names = [r["name"] for r in rows]
    assert names[:6] == ["debian-minimal", "debian-systemd", "debian-vnc", "ubuntu-minimal",
                         "ubuntu-systemd", "ubuntu-vnc"]  # fmt: skip
    first = rows[0]
    assert first["suite"] == "trixie" and first["variant"] == "minimal" and first["init"] == "none"
    assert first["built"] is False and first["default"] is True
    assert "python-is-python3" in first["packages"]
    assert rows[3]["available"] is False and "TLIMAGE_UBUNTU_MIRROR" in rows[3]["note"]
    plain = tl("sbx", "image", "bases", env={"TLIMAGE_CACHE_DIR": str(tmp_path)})
    assert plain.stdout.splitlines()[0].split()[:4] == ["NAME", "DISTRIBUTION", "SUITE", "VARIANT"]


def test_doctor_reports_every_check(tmp_path: Path) -> None:
    out = tl(
        "sbx", "doctor", "--json", env={"TLIMAGE_CACHE_DIR": str(tmp_path), "TLIMAGE_KVM": "0"}
    )
    assert out.returncode in (0, 1), out.stderr
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert list(checks) == ["kvm", "cgroups", "user namespaces", "seccomp", "network helper",
                            "namespace backend", "base images", "cache",
                            "stray sandboxes"]  # fmt: skip
    assert all(c["status"] in ("ok", "warn", "missing") and c["detail"] for c in checks.values())
    assert "default debian-minimal" in checks["base images"]["detail"]
    assert (
        checks["stray sandboxes"]["status"] == "ok" and checks["stray sandboxes"]["sandboxes"] == []
    )
