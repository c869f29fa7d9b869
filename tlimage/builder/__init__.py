"""The programmatic build API.

    for event in tlimage.build("image.py", project="demo"):   # or tlimage.builder.build
        print(event)

`build()` yields the same events `tl sbx image create --json` prints, ending with `done` or
`error`; `build_image()` runs to completion and returns a `BuildResult` (or raises).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlimage.builder.loop import Builder, BuildOptions, BuildResult, Emit
from tlimage.errors import StepFailed, TlimageError

__all__ = ["BuildOptions", "BuildResult", "build", "build_image", "error_event"]


def _resolve(source: Any, image_name: str | None, frontend_options: dict[str, Any]) -> Any:
    from tlimage import frontends
    from tlimage.ir import ImageDef

    if isinstance(source, ImageDef):
        return source, None
    if hasattr(source, "to_ir"):
        return source.to_ir(), None
    path = Path(source)
    images = frontends.load(path, **frontend_options)
    return frontends.select(images, image_name, path), path


def build_image(
    source: Any,
    /,
    *,
    image_name: str | None = None,
    emit: Emit | None = None,
    frontend_options: dict[str, Any] | None = None,
    **options: Any,
) -> BuildResult:
    """Build `source` (a file path, an `Image`, or an `ImageDef`) and register it."""
    opts = BuildOptions(**options)
    frontend_options = dict(frontend_options or {})
    if _is_dockerfile(source):
        frontend_options.setdefault("resolve_base", _base_resolver(opts, emit))
    image, path = _resolve(source, image_name, frontend_options)
    if path is not None:
        if "context_dir" not in options:  # a folder is the context; a file's folder is
            opts.context_dir = path.resolve() if path.is_dir() else path.resolve().parent
        opts.source = opts.source or str(path.resolve())
        if not opts.ignore:
            opts.ignore = _ignore_patterns(path, opts.context_dir)
    builder = Builder(image, opts, emit or (lambda _e: None))
    try:
        return builder.run()
    finally:
        builder.close()


def build(source: Any, /, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Build in a background thread, yielding events as they happen. Closing the generator
    early lets the current step finish and registers nothing."""
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancel = threading.Event()

    def emit(event: dict[str, Any]) -> None:
        if cancel.is_set():
            raise TlimageError("build cancelled")
        events.put(event)

    def work() -> None:
        try:
            build_image(source, emit=emit, **kwargs)
        except TlimageError as e:
            if not cancel.is_set():
                events.put(error_event(e))
        except BaseException as e:  # noqa: BLE001 - reported as an event, never lost
            events.put(
                {
                    "event": "error",
                    "message": f"{type(e).__name__}: {e}",
                    "file": None,
                    "line": None,
                    "column": None,
                    "json_path": None,
                }
            )
        finally:
            events.put(None)

    thread = threading.Thread(target=work, name="tlimage-build", daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:
        cancel.set()
        thread.join()


def error_event(e: TlimageError) -> dict[str, Any]:
    """The `error` event: the message as shown to a person, and where the error is as
    structured fields (`file`, `line`, `column`, `json_path`; null when not known)."""
    event: dict[str, Any] = {"event": "error", "message": e.render(), **e.location_fields()}
    if isinstance(e, StepFailed):
        event.update(message=e.message, at=e.location, exit_code=e.step_exit_code,
                     log_tail=list(e.log_tail))  # fmt: skip
    return event


def _is_dockerfile(source: Any) -> bool:
    if not isinstance(source, str | Path):
        return False
    from tlimage import frontends

    p = Path(source)
    if p.is_dir():
        p = p / "Dockerfile"
    try:
        return p.is_file() and frontends.kind_of(p) == "dockerfile"
    except TlimageError:
        return False


def _base_resolver(opts: BuildOptions, emit: Emit | None) -> Any:
    """What a Dockerfile's lowering learns of a base image before the build: its ENV and
    WORKDIR (for word expansion) and its ONBUILD triggers. Registered images answer from the
    registry; registry images are resolved, their layers not fetched (the build reuses that
    resolution, and fetches the layers when a step needs them). Seed bases and
    failures answer None: the lowering's defaults, and the build reports the error at FROM."""
    from tlimage.builder.bases import KNOWN_BASES
    from tlimage.frontends.dockerfile.lower import BaseImage

    def to_base(config: Any) -> BaseImage:
        return BaseImage(env=tuple(config.env), workdir=config.workdir or "/",
                         onbuild=tuple(config.onbuild))  # fmt: skip

    def resolve(ref: str) -> BaseImage | None:
        name, _, pin = ref.partition("@")
        if not pin and (name in KNOWN_BASES or name == "scratch"):
            return None
        try:
            from tlimage.builder.config import ImageConfig
            from tlimage.registry import Registry

            if not pin and "/" not in name:
                rec = Registry().find(opts.project, name)
                if rec is not None:
                    return to_base(ImageConfig.from_json(rec.manifest.config))
            from tlimage.builder.config import config_from_oci
            from tlimage.cache.cache import LayerCache
            from tlimage.oci import pull as oci_pull

            with LayerCache(opts.cache_dir) as cache:
                res = oci_pull.resolve(ref, cache, platform=opts.platform, refresh=opts.pull,
                                       config=opts.registry_config)  # fmt: skip
            opts.resolved[ref] = res
            return to_base(config_from_oci(res.config))
        except TlimageError:
            return None

    return resolve


def _ignore_patterns(path: Path, context: Path) -> tuple[str, ...]:
    """`<file>.dockerignore` beside the image file, else `.dockerignore` at the context root."""
    from tlimage.cache.ignore import IgnoreMatcher, find_ignore_file

    found = find_ignore_file(Path(context).resolve(), path.resolve())
    return tuple(IgnoreMatcher.from_file(found).patterns) if found else ()
