"""The runtime's backends and the in-package fake all implement `sandbox.backend.Backend`."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tlimage.errors import RuntimeError_
from tlimage.sandbox.backend import (
    BACKEND_METHODS,
    OPTIONAL_METHODS,
    Backend,
    MemoryBackend,
    TtyBackend,
)
from tlimage.sandbox.fake import FakeBackend


def backends() -> list[type]:
    from tlimage.runtime.microvm import MicroVMBackend
    from tlimage.runtime.namespace import NamespaceBackend

    return [MicroVMBackend, NamespaceBackend, FakeBackend]


@pytest.mark.parametrize("cls", backends(), ids=lambda c: c.__name__)
def test_backend_implements_the_protocol(cls: type) -> None:
    assert isinstance(cls(), Backend)
    assert "start" in BACKEND_METHODS and "frozen_upper" in BACKEND_METHODS
    for name in BACKEND_METHODS:
        want = inspect.signature(getattr(Backend, name))
        got = inspect.signature(getattr(cls, name))
        assert [(p.name, p.kind) for p in got.parameters.values()] == [
            (p.name, p.kind) for p in want.parameters.values()
        ], f"{cls.__name__}.{name}"


def test_runtime_calls_only_protocol_methods() -> None:
    """Every backend method the API calls is in the Protocol (so the fake covers it)."""
    import re

    import tlimage.runtime._api as api

    src = Path(api.__file__).read_text()
    called = set(re.findall(r"\b(?:be|self\._backend\(\))\.([a-z_]+)\(", src))
    known = set(BACKEND_METHODS) | set(OPTIONAL_METHODS)
    assert called and called <= known, called - known


def test_optional_methods_match_their_protocol() -> None:
    from tlimage.runtime.microvm import MicroVMBackend
    from tlimage.runtime.namespace import NamespaceBackend

    for name, proto in OPTIONAL_METHODS.items():
        want = inspect.signature(getattr(proto, name))
        for cls in backends():
            if hasattr(cls, name):
                got = inspect.signature(getattr(cls, name))
                assert [p.name for p in got.parameters.values()] == [
                    p.name for p in want.parameters.values()
                ], f"{cls.__name__}.{name}"
    assert isinstance(NamespaceBackend(), TtyBackend)
    assert isinstance(MicroVMBackend(), MemoryBackend)


class Rec:
    def __init__(self, path: Path) -> None:
        self.id, self.name, self.status, self.path = "sb-fake00001", None, "Running", path


def test_fake_moves_files_and_exports_its_changes(tmp_path: Path) -> None:
    fb = FakeBackend()
    rec = Rec(tmp_path / "sb")
    with pytest.raises(RuntimeError_, match="not running"):
        fb.exec(rec, ["true"], [], "root", "/")  # type: ignore[arg-type]
    fb.start(rec, [], None)  # type: ignore[arg-type]
    (tmp_path / "f").write_text("data")
    assert fb.put(rec, tmp_path / "f", "/work") == "/work/f"  # type: ignore[arg-type]
    out = tmp_path / "out"
    out.mkdir()
    assert fb.get(rec, "/work/f", out).read_text() == "data"  # type: ignore[arg-type]
    with fb.frozen_upper(rec, tmp_path / "upper", [], True):  # type: ignore[arg-type]
        assert (tmp_path / "upper" / "work" / "f").read_text() == "data"
    fb.on_exec = lambda argv: len(argv)
    assert fb.exec(rec, ["a", "b"], [], "root", "/") == 2  # type: ignore[arg-type]
    fb.stop(rec)  # type: ignore[arg-type]
    assert not fb.alive(rec)  # type: ignore[arg-type]
    assert ("thaw", rec.id) in fb.calls
