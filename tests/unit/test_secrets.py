"""The secrets store: per project, 0600, atomic, names checked, values never printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlimage.errors import RuntimeError_
from tlimage.runtime import list_secrets, remove_secret, set_secret
from tlimage.runtime._secrets import check_secrets_exist, secret_env


def _store(project: str = "default") -> Path:
    return Path(os.environ["TLIMAGE_STATE_DIR"]) / "secrets" / f"{project}.json"


def test_set_list_remove_per_project() -> None:
    assert set_secret("A", "1") is False
    assert set_secret("A", "2") is True
    set_secret("B_2", "x y", project="other")
    assert list_secrets() == ["A"] and list_secrets(project="other") == ["B_2"]
    assert secret_env(["A"], project="default") == ["A=2"]
    assert _store().stat().st_mode & 0o777 == 0o600
    assert _store().parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in _store().parent.iterdir() if p.name.endswith(".tmp")] == []
    remove_secret("A")
    assert list_secrets() == []
    with pytest.raises(RuntimeError_, match="no secret 'A'"):
        remove_secret("A")


@pytest.mark.parametrize("name", ["1A", "A-B", "", "A B", "x" * 129])
def test_bad_names(name: str) -> None:
    with pytest.raises(RuntimeError_, match="invalid secret name"):
        set_secret(name, "v")


def test_missing_and_removed_names_are_named() -> None:
    set_secret("HAVE", "v")
    with pytest.raises(RuntimeError_, match="no secret 'NOPE'"):
        check_secrets_exist(["HAVE", "NOPE"])
    assert check_secrets_exist(["HAVE", "HAVE"]) == ["HAVE"]
    with pytest.raises(RuntimeError_, match="'GONE' of this sandbox was removed"):
        secret_env(["HAVE", "GONE"], project="default")


def test_corrupt_store_is_an_error_without_values() -> None:
    set_secret("A", "topsecret")
    _store().write_text('{"A": "topsecret", ')
    with pytest.raises(RuntimeError_, match="not valid JSON") as e:
        list_secrets()
    assert "topsecret" not in str(e.value)


def _tl(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from tlimage.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          input=stdin, timeout=60)  # fmt: skip


def test_cli_reads_the_value_from_stdin_and_never_prints_it() -> None:
    for item in ("K1", "K2=-"):
        r = _tl("secrets", "set", item, stdin="from-stdin\n")
        assert r.returncode == 0 and "from-stdin" not in r.stdout + r.stderr
    r = _tl("secrets", "set", "K3=inline", stdin="")
    assert r.returncode == 0 and "inline" not in r.stdout + r.stderr
    r = _tl("secrets", "ls", "--json", stdin="")
    assert r.stdout.strip() == '["K1", "K2", "K3"]'
    assert secret_env(["K1", "K2", "K3"], project="default") == [
        "K1=from-stdin",
        "K2=from-stdin",
        "K3=inline",
    ]
    r = _tl("secrets", "rm", "K9", stdin="")
    assert r.returncode == 1 and "no secret 'K9'" in r.stderr and "Traceback" not in r.stderr
