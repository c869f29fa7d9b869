"""VM tests: whatever a test leaves running (a test that fails midway never reaches its own
`terminate()`) is terminated before its state folder goes away, so no QEMU or sandbox survives
the test run. Only what the test made is swept: the sweep looks in the test's own state folder
(tests/conftest.py gives each test one) and spares sandboxes that were live before it began."""

from __future__ import annotations

import contextlib
import os

import pytest


def _live(state: str) -> dict[str, object]:
    from tlimage.runtime import list_sandboxes

    saved = os.environ.get("TLIMAGE_STATE_DIR")
    os.environ["TLIMAGE_STATE_DIR"] = state
    try:
        with contextlib.suppress(Exception):
            return {sb.id: sb for sb in list_sandboxes(all_projects=True)}  # live ones only
        return {}
    finally:
        if saved is None:
            os.environ.pop("TLIMAGE_STATE_DIR", None)
        else:
            os.environ["TLIMAGE_STATE_DIR"] = saved


@pytest.fixture(autouse=True)
def _terminate_leftover_sandboxes(_isolated_state):  # noqa: ANN001, ANN202
    # Asks for _isolated_state so that it runs inside it: the sweep sees the test's folder.
    state = os.environ["TLIMAGE_STATE_DIR"]  # the test's own (tests/conftest.py)
    before = set(_live(state))
    yield
    for sid, sb in _live(state).items():
        if sid not in before:
            with contextlib.suppress(Exception):
                sb.terminate()


@contextlib.contextmanager
def state_in(base):  # noqa: ANN001, ANN201 - a Path; a context manager
    """TLIMAGE_CACHE_DIR and TLIMAGE_STATE_DIR under `base` while the block runs: a sandbox
    that a module's tests share (one microVM boot) lives there, not in one test's folders."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLIMAGE_CACHE_DIR", str(base / "cache"))
        mp.setenv("TLIMAGE_STATE_DIR", str(base / "state"))
        yield


def _image_with_secrets(folder, name: str, image: str, secrets: dict[str, str]) -> list[str]:  # noqa: ANN001
    """Builds `image` (a DSL file, `{name}` filled in) as `name` in `folder` and stores the
    secrets; returns their names for Sandbox.create."""
    from tlimage.builder import build_image
    from tlimage.runtime import set_secret

    (folder / "image.py").write_text(image.format(name=name))
    build_image(folder / "image.py", isolation="namespace")
    for key, value in secrets.items():
        set_secret(key, value)
    return list(secrets)


@contextlib.contextmanager
def module_microvm(tmp_path_factory, name: str, image: str, secrets: dict[str, str] | None = None):  # noqa: ANN001, ANN201
    """One microVM sandbox for a module's tests (a TCG boot is slow), in a state folder of its
    own: yields (sandbox, that folder) and terminates it at the end."""
    import shutil

    from tlimage.runtime import Sandbox

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed (scripts/setup.sh installs it)")
    tmp = tmp_path_factory.mktemp(name)
    with state_in(tmp):
        names = _image_with_secrets(tmp, name, image, secrets or {})
        sb = Sandbox.create(name, backend="microvm", timeout=3600, secret_names=names or None)
    try:
        yield sb, tmp
    finally:
        with state_in(tmp):
            sb.terminate()


@contextlib.contextmanager
def sandbox_on_backend(
    request, tmp_path, name: str, image: str, secrets: dict[str, str] | None = None
):  # noqa: ANN001, ANN201
    """The sandbox for a test parametrized over ["namespace", "microvm"]: the module's shared
    microVM (its `vm_sandbox` fixture, a module_microvm) or a fresh namespace sandbox."""
    from tlimage.runtime import Sandbox

    if request.param == "microvm":
        sb, base = request.getfixturevalue("vm_sandbox")
        with state_in(base):
            yield sb
        return
    names = _image_with_secrets(tmp_path, name, image, secrets or {})
    with Sandbox.create(name, backend="namespace", secret_names=names or None) as sb:
        yield sb
