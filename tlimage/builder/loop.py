"""The build loop: walk the IR, reuse cached layers, run misses in the executor, snapshot,
register.

For each needed stage, in dependency order, a chain key is carried from step to step
(`cache.keys`). Config steps (ENV, USER, CMD, ...) only change the image config; filesystem steps
(RUN, COPY, ADD, WORKDIR) look their key up in the layer index — a hit stacks the stored layer, a
miss runs the step (RUN in the executor on the stacked layers, COPY/ADD on the host) and stores
what changed as a new layer. At the end the target stage's layers and config are written as a
manifest blob (the snapshot) and the name is registered — only then, so an interrupted or failed
build registers nothing.

Events go to `emit` as plain dicts (the `--json` stream and the `tlimage.build()` generator carry
them unchanged); see `events.py` for their shapes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.builder import context as ctx
from tlimage.builder import lazy
from tlimage.builder.config import ImageConfig
from tlimage.builder.lazy import Deferred, Layer
from tlimage.builder.mounts import Redactor, StepMounts
from tlimage.builder.mounts import key_inputs as mount_key_inputs
from tlimage.cache import keys
from tlimage.cache.unpacked import adopt_upper, unpacked_layer
from tlimage.errors import (
    BuildError,
    DiskFullError,
    ExecutorError,
    OCIError,
    StepFailed,
    TlimageError,
)
from tlimage.ir.describe import describe
from tlimage.registry.db import ImageRecord, LayerRef, Manifest, Registry

Emit = Callable[[dict[str, Any]], None]
LOG_TAIL_LINES = 20

# Set in every RUN step unless the step sets it: the seed bases keep Debian's PEP 668 marker
# (EXTERNALLY-MANAGED) for their system Python, and users expect `pip install x` to work there.
BUILD_ENV_DEFAULTS = (("PIP_BREAK_SYSTEM_PACKAGES", "1"), ("DEBIAN_FRONTEND", "noninteractive"))


@dataclass
class BuildOptions:
    context_dir: Path = Path(".")
    project: str = "default"
    registered_name: str | None = None  # NAME or NAME:TAG; default: the image's name
    tag: str | None = None  # default: the image's tag
    cache_dir: Path | None = None
    no_cache: bool = False
    explain: bool = False
    isolation: str = "auto"
    platform: str = "linux/amd64"
    build_args: dict[str, str] = field(default_factory=dict)
    step_timeout: float | None = None
    register: bool = True
    ignore: tuple[str, ...] = ()  # .dockerignore-style patterns for the context
    host_ca: str = "auto"  # "auto" | "on" | "off": trust the host's CA bundle in RUN steps
    source: str | None = None  # the file the image came from, recorded in the registry
    also_register: tuple[tuple[str, str], ...] = ()  # more (name, tag) pairs for the image
    replace: bool = False  # take over a name that holds an image from another source
    # Values for RUN --mount=type=secret, by id: the bytes, or a file to read them from. They
    # never enter a key, a layer, the image or the logs (see builder.mounts).
    secrets: dict[str, Path | bytes] = field(default_factory=dict, repr=False)
    executor: Any = None  # an Executor; default: chosen by `isolation`
    # Registry images (FROM, COPY --from, RUN --mount from=): `pull` re-resolves tags (else the
    # last resolution is reused offline); `registry_config` is a tlimage.oci RegistryConfig.
    pull: bool = False
    registry_config: Any = None
    # A build cache in a registry (tlimage.oci.cache): read before, written after the build.
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    # Registry images the front end already resolved (reference -> oci.pull.Resolved).
    resolved: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ImageSource:
    """An image a stage starts from or reads: a registered image, a seed base or a registry
    image. `identity` enters cache keys (an image id, a seed base's diff_id, a manifest
    digest)."""

    layers: list[Layer]
    config: ImageConfig
    identity: str
    desc: str  # for the registry record and messages: name@digest


@dataclass
class BuildResult:
    image: ir.ImageDef
    manifest: Manifest
    image_id: str
    record: ImageRecord | None
    cached_steps: int
    executed_steps: int
    duration: float


@dataclass
class _StageState:
    layers: list[Layer]  # bottom first; a Deferred is fetched on first need (builder.lazy)
    config: ImageConfig
    key: str
    base_desc: str


class Builder:
    def __init__(self, image: ir.ImageDef, opts: BuildOptions, emit: Emit) -> None:
        from tlimage.cache.cache import LayerCache

        self.image = image
        self.opts = opts
        self.emit = emit
        self.cache = LayerCache(
            opts.cache_dir, on_wait=lambda msg: emit({"event": "status", "message": msg})
        )
        self.store = self.cache.store
        self._hasher = None
        self.registry = Registry()
        self.stages: dict[str, _StageState] = {}
        self._executor = opts.executor
        self._own_executor = opts.executor is None
        self.cached = 0
        self.executed = 0
        self._previous = self.cache.last_build(self._build_name()) if opts.explain else None
        self._images: dict[str, ImageSource] = {}
        self._oci_client: Any = None
        self._remote: Any = None
        self._this_build: list[tuple[str, dict[str, Any]]] = []
        self._base_keys: list[str] = []  # the seed bases' layer keys, for --cache-to
        self._current: tuple[str | None, str | None] = (None, None)  # (where, step) for errors

    def _build_name(self) -> str:
        name = (self.opts.registered_name or self.image.name).partition(":")[0]
        return f"{self.opts.project}/{name}"

    # -- executor ------------------------------------------------------------------------

    @property
    def executor(self) -> Any:
        if self._executor is None:
            from tlimage.executor import select_executor

            self._executor = select_executor(
                self.opts.isolation,
                notice=lambda msg: self.emit({"event": "status", "message": msg}),
                cache_dir=self.opts.cache_dir,
            )
        return self._executor

    def close(self) -> None:
        if self._own_executor and self._executor is not None:
            self._executor.close()
            self._executor = None
        if self._hasher is not None:
            self._hasher.close()
        if self._oci_client is not None:
            self._oci_client.close()
        self.cache.close()

    # -- the walk ------------------------------------------------------------------------

    def _refs(self) -> list[tuple[str, str]]:
        """Where the image gets registered, checked before any step runs."""
        from tlimage.registry.db import parse_ref

        name = self.opts.registered_name or self.image.name
        if ":" in name and self.opts.tag is None:
            name, tag = parse_ref(name)
        else:
            name, tag = parse_ref(f"{name}:{self.opts.tag or self.image.tag}")
        return [(name, tag), *(parse_ref(f"{n}:{t}") for n, t in self.opts.also_register)]

    def _check_names(self, refs: list[tuple[str, str]]) -> None:
        """A registered name belongs to the source it was built from: rebuilding the same image
        file updates it; another source (a different file, a sandbox snapshot) needs
        `replace`. Checked before any step runs."""
        if self.opts.replace:
            return
        for name, tag in refs:
            rec = self.registry.taken(self.opts.project, f"{name}:{tag}", self.opts.source)
            if rec is None:
                continue
            raise NameTaken(
                f"{name}:{tag} in project {self.opts.project!r} holds an image from "
                f"{rec.source or 'the Python API'}, not from {self.opts.source or 'the Python API'}",
                hint="pass --replace to register this image under that name anyway, or choose "
                "another name with -t/--name",
            )

    def run(self) -> BuildResult:
        from tlimage.builder.gc import sweep_scratch

        if self.opts.register:
            self._check_names(self._refs())
        try:
            with self.cache.session():
                sweep_scratch(self.store)
                return self._run_locked()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self._disk_full(e) from None
        except sqlite3.OperationalError as e:
            if "full" not in str(e):
                raise
            raise self._disk_full(OSError(errno.ENOSPC, str(e), self.cache.root)) from None

    def _disk_full(self, e: OSError) -> TlimageError:
        """One clear error for a full disk: the step it happened in and the folder that is
        full. Whatever the step had written is gone (scratch folders, uncommitted blobs)."""
        from tlimage.builder.gc import full_folder

        folder = full_folder([e.filename, self._scratch_dir(), self.store.path,
                              tempfile.gettempdir()])  # fmt: skip
        where, desc = self._current
        what = f"step {desc!r}" if desc else "the build"
        err = DiskFullError(
            f"{where + ': ' if where else ''}no space left on the device while running {what}: "
            f"{folder} is full",
            hint="free some space there (`tl sbx image prune` drops unused cache entries), or "
            "point --cache-dir / TLIMAGE_CACHE_DIR at a bigger disk; the cache is intact",
        )
        return err

    @property
    def oci_client(self) -> Any:
        if self._oci_client is None:
            from tlimage.oci.client import RegistryClient

            self._oci_client = RegistryClient(self.opts.registry_config)
        return self._oci_client

    def _status(self, message: str) -> None:
        self.emit({"event": "status", "message": message})

    def _run_locked(self) -> BuildResult:
        t0 = time.monotonic()
        if self.opts.cache_from and not self.opts.no_cache:
            from tlimage.oci.cache import RemoteCache

            self._remote = RemoteCache(list(self.opts.cache_from), self.oci_client, self._status)
            self._status(f"remote cache: {len(self._remote)} steps in "
                         f"{', '.join(self.opts.cache_from)}")  # fmt: skip
        for stage in self.image.needed_stages():
            self._build_stage(stage)
        target = self.stages[self.image.target_stage.name]
        self._current = (None, None)
        manifest = Manifest(
            layers=tuple(self.need(target.layers)),
            config=target.config.to_json(),
            base=target.base_desc,
            ir_digest=self.image.digest(),
        )
        blob = self.store.put_bytes(manifest.to_bytes())
        image_id = manifest.image_id()
        self.emit({"event": "snapshot_created", "image_id": image_id, "manifest": blob.digest,
                   "layers": len(manifest.layers),
                   "size": sum(la.size for la in manifest.layers)})  # fmt: skip
        self.cache.record_build(self._build_name(), self._this_build)
        record = None
        if self.opts.register:
            for i, (name, tag) in enumerate(self._refs()):
                rec = self.registry.register(self.opts.project, name, tag, manifest,
                                             self.opts.source)  # fmt: skip
                record = record if i else rec
                self.emit({"event": "image_registered", "project": self.opts.project,
                           "name": name, "tag": tag, "image_id": image_id})  # fmt: skip
        for ref in self.opts.cache_to:
            from tlimage.oci.cache import export

            try:
                stats = export(self.cache, [*self._base_keys, *(k for k, _ in self._this_build)],
                               ref, self.oci_client, self._remote)  # fmt: skip
            except TlimageError as e:
                e.message = f"--cache-to {ref}: {e.message}"
                e.args = (e.message,)
                raise
            self._status(
                f"cache exported to {ref}: {len(stats.uploaded)} blobs uploaded "
                f"({stats.bytes / 1e6:.1f} MB), {len(stats.mounted)} mounted, "
                f"{len(stats.existing)} already there"
            )
        duration = time.monotonic() - t0
        self.emit({"event": "done", "image_id": image_id, "duration": round(duration, 3),
                   "cached_steps": self.cached, "executed_steps": self.executed})  # fmt: skip
        return BuildResult(self.image, manifest, image_id, record, self.cached, self.executed,
                           duration)  # fmt: skip

    def _build_stage(self, stage: ir.Stage) -> None:
        # A stage read by COPY --from or a mount enters keys by its final cache key, which covers
        # the files it copied; its IR digest would not, and a changed file would be missed.
        refs = {name: self.stages[name].key
                for name in stage.stage_refs() if name in self.stages}  # fmt: skip
        # COPY --from=<image>: the image's resolved identity (a pulled digest) enters the key.
        for step, meta in stage.items():
            if isinstance(step, ir.Copy) and step.from_ and step.from_ not in self.stages \
                    and step.from_ not in refs:  # fmt: skip
                refs[step.from_] = self.image_source(step.from_, meta).identity
        self._current = (
            stage.meta[0].span.short if stage.meta and stage.meta[0].span else None,
            describe(stage.base, 60),
        )
        state = self._base(stage, stage.base, stage.meta[0])
        n = len(stage.steps)
        for i, (step, meta) in enumerate(stage.items()):
            if i == 0:
                continue
            self._current = (meta.span.short if meta.span else None, describe(step, 60))
            self._step(stage, i, n, step, meta, state, refs)
        self.stages[stage.name] = state

    # -- FROM ----------------------------------------------------------------------------

    def _base(self, stage: ir.Stage, base: ir.From, meta: ir.StepMeta) -> _StageState:
        where = str(meta.span.short) if meta.span else None
        self.emit({"event": "step_started", "stage": stage.name, "index": 0,
                   "total": len(stage.steps), "step": describe(base), "at": where})  # fmt: skip
        if base.stage is not None:
            dep = self.stages[base.stage]
            # ONBUILD triggers were run by the front end; the new stage does not carry them on.
            config = dataclasses.replace(dep.config, onbuild=())
            return dataclasses.replace(dep, layers=list(dep.layers), config=config)
        name = base.image or "scratch"
        if name == "scratch":
            state = _StageState([], ImageConfig(), keys.step_components("", {"base": "scratch"})
                                .key(), "scratch")  # fmt: skip
        else:
            src = self.image_source(name, meta, pin=base.pin, stage=stage.name)
            # The base's ONBUILD triggers ran at the start of this stage (front end); as in
            # Docker they are not carried into the new image.
            state = _StageState(list(src.layers), dataclasses.replace(src.config, onbuild=()),
                                keys.step_components("", {"base": src.identity}).key(),
                                src.desc)  # fmt: skip
        self.emit({"event": "step_cached", "stage": stage.name, "index": 0,
                   "step": describe(base), "key": state.key})  # fmt: skip
        return state

    def image_source(self, name: str, meta: ir.StepMeta | None = None, *, pin: str | None = None,
                     stage: str | None = None) -> ImageSource:  # fmt: skip
        """Resolve an image name: a remote reference (a host or a digest in it) is pulled; else
        an image registered in the project, a seed base, and last a registry image
        (`debian:bookworm` is docker.io/library/debian:bookworm)."""
        from tlimage.builder.bases import KNOWN_BASES, base_config

        memo = f"{name}@{pin}" if pin else name
        if memo in self._images:
            return self._images[memo]
        remote = pin is not None and pin.startswith("sha256:")
        pins: tuple[str, ...] = ()  # what a pin may name besides the identity
        if not remote and "/" not in name and (rec := self.registry.find(self.opts.project,
                                                                         name)):  # fmt: skip
            src = ImageSource(list(rec.manifest.layers), ImageConfig.from_json(rec.manifest.config),
                              rec.image_id, f"{rec.ref}@{rec.image_id}")  # fmt: skip
        elif not remote and name in KNOWN_BASES:
            layer = self._seed_base(name)
            # Its identity is the tree's diff_id, known before the bytes when the layer is in a
            # --cache-from registry cache (a local layer digest is not); a pin may still name
            # the stored layer's digest.
            src = ImageSource([layer], base_config(name), layer.diff_id,
                              f"{name}@{layer.diff_id}")  # fmt: skip
            pins = (layer.digest,) if isinstance(layer, LayerRef) else ()
        else:
            src = self._pull(name + (f"@{pin}" if pin else ""), meta, stage)
            pin = None  # the digest was part of the reference
        pins = (src.identity, *pins)
        if pin and pin not in (*pins, *map(_hex, pins)):
            err = TlimageError(f"base image {name!r} is pinned to {pin} but is now "
                               f"{src.identity}", hint="update the pin, or rebuild the base it "
                               "named")  # fmt: skip
            raise _at(meta, err) if meta else err
        self._images[memo] = src
        return src

    def _seed_base(self, name: str) -> Layer:
        """A seed base's layer: from the cache, else (deferred) from the --cache-from registry
        cache — a fresh machine never runs mmdebstrap — else built."""
        from tlimage.builder.bases import base_cache_key, ensure_base

        key = base_cache_key(name)
        if self.opts.cache_to:  # --cache-to carries the base too: a fresh machine skips it
            self._base_keys.append(key)
        if self._remote is not None and self.cache.lookup(key) is None \
                and (entry := self._remote.entry(key)) is not None:  # fmt: skip
            return Deferred(key, entry.diff_id, entry.size, f"base image {name}")
        return ensure_base(name, self.cache, self.emit, self.opts.cache_dir)[0]

    # -- layers not fetched yet ----------------------------------------------------------

    def need(self, layers: Sequence[Layer]) -> list[LayerRef]:
        """`layers` with those a --cache-from registry cache holds fetched into the store
        (`tlimage.builder.lazy`)."""
        return lazy.need(layers, self._fetch)

    def _fetch(self, missing: list[Deferred]) -> None:
        """Fetch `missing`: those of the --cache-from maps in one parallel download, those of
        each registry image with the image's pull."""
        from tlimage.builder.bases import _n, pull_progress
        from tlimage.oci import pull as oci_pull

        groups: dict[int, list[Deferred]] = {}
        for d in missing:
            groups.setdefault(id(d.origin), []).append(d)
        for group in groups.values():
            origin = group[0].origin
            t0 = time.monotonic()
            try:
                if origin is None:
                    recs, got = self._remote.fetch(self.cache, [d.key for d in group])
                    refs = {k: LayerRef(r.digest, r.diff_id, r.size) for k, r in recs.items()}
                    self._status(f"remote cache: fetched {_n(len(group), 'layer')} "
                                 f"({got / 1e6:.1f} MB downloaded) in "
                                 f"{time.monotonic() - t0:.1f}s")  # fmt: skip
                else:
                    img = oci_pull.fetch(origin, self.cache, client=self.oci_client,
                                         progress=pull_progress(self.emit))  # fmt: skip
                    refs = {oci_pull.layer_key(la.blob): LayerRef(la.digest, la.diff_id, la.size)
                            for la in img.layers}  # fmt: skip
            except TlimageError as e:
                raise self._not_fetched(e, group) from None
            for d in group:
                d.ref = refs[d.key]

    def _not_fetched(self, e: TlimageError, group: list[Deferred]) -> TlimageError:
        """`e`, said as the layers the current step (or the final image) needs."""
        from tlimage.builder.bases import _n

        where, desc = self._current
        cached = group[0].origin is None
        what = _n(len(group), "cached layer" if cached else "layer")
        e.message = (f"{where + ': ' if where else ''}"
                     f"{'step ' + repr(desc) if desc else 'the image'} needs {what} of "
                     f"{group[0].what}{' and more' if cached and len(group) > 1 else ''}"
                     f"{' from the remote cache' if cached else ''}, which could not be "
                     f"fetched: {e.message}")  # fmt: skip
        e.args = (e.message,)
        if cached:
            e.hint = ("the --cache-from registry lost or damaged the layer: build again with "
                      "--no-cache, or without that --cache-from")  # fmt: skip
        return e

    def _pull(self, ref: str, meta: ir.StepMeta | None, stage: str | None) -> ImageSource:
        """A registry image, resolved (manifest and config); its layers are fetched when a step
        or the final image needs them (`need`), so a stage whose steps are all cached never
        downloads its base."""
        from tlimage.builder.config import config_from_oci
        from tlimage.oci import pull as oci_pull

        try:
            img = self.opts.resolved.get(ref) or oci_pull.resolve(
                ref, self.cache, platform=self.opts.platform, refresh=self.opts.pull,
                client=self.oci_client)  # fmt: skip
        except OCIError as e:
            if not e.message.startswith(ref):
                e.message = f"{ref}: {e.message}"
                e.args = (e.message,)
            if e.hint is None or "unknown image" in e.message or "does not resolve" in e.message:
                from tlimage.builder.bases import KNOWN_BASES

                known = ", ".join(
                    [*KNOWN_BASES, *(r.ref for r in self.registry.list(self.opts.project))]
                )
                e.hint = ((e.hint + "; ") if e.hint else "") + (
                    f"not a registry image? available locally: {known} (`tl sbx image bases`, "
                    "`tl sbx image ls`); for a Python image, debian-minimal carries Python 3 "
                    "with pip"
                )
            raise _at(meta, e) if meta else e from None
        if img.moved_from:
            reason = f"base {ref} moved: {img.moved_from} -> {img.digest}"
            self.emit({"event": "status", "message": reason})
            if self.opts.explain:
                self.emit({"event": "explain", "stage": stage or "", "index": 0, "step": ref,
                           "reason": reason})  # fmt: skip
        layers: list[Layer] = [
            LayerRef(la.digest, la.diff_id, la.size) if la is not None
            else Deferred(oci_pull.layer_key(d["digest"]), d["diff_id"], int(d["size"]),
                          f"image {ref}", origin=img)
            for la, d in zip(oci_pull.stored_layers(self.cache, img), img.layers, strict=True)
        ]  # fmt: skip
        return ImageSource(layers, config_from_oci(img.config), img.digest,
                           f"{img.name}@{img.digest}")  # fmt: skip

    # -- other steps ---------------------------------------------------------------------

    def _step(self, stage: ir.Stage, i: int, n: int, step: ir.Step, meta: ir.StepMeta,
              state: _StageState, refs: dict[str, str]) -> None:  # fmt: skip
        where = meta.span.short if meta.span else None
        desc = describe(step)
        base_event = {"stage": stage.name, "index": i, "step": desc}
        self.emit({"event": "step_started", **base_event, "total": n, "at": where})
        if step.op not in ir.steps.FILESYSTEM_OPS:
            state.config = state.config.apply(step, self.opts.build_args)
            comps = keys.step_components(state.key, _step_obj(step, refs))
            state.key = comps.key()
            self._this_build.append((state.key, {"step": desc, **comps.to_json()}))
            self.emit({"event": "step_done", **base_event, "config_only": True, "duration": 0.0})
            return

        files: dict[str, str] = {}
        sources: list[ctx.Source] = []
        if isinstance(step, ir.Copy | ir.Add) and not _from_other(step):
            local = [s for s in step.sources if not _is_url(s)]
            try:
                files = self._file_digests(local, step.excludes)
                sources = ctx.select_sources(
                    self.opts.context_dir, local, ignored=self._ignore(step.excludes).matches
                )
            except TlimageError as e:
                raise _at(meta, e) from None
        if isinstance(step, ir.Add):
            # The key covers what each URL serves now (revalidated, see builder.fetch).
            for d in self._downloads(step, meta):
                files[f"url:{d.url}"] = d.digest
                sources.append(ctx.Source(d.path.parent, d.path.name, d.name, d.name,
                                          archive=False, mode=0o600))  # fmt: skip
        env = state.config.run_env() if isinstance(step, ir.Run) else {}
        extra: dict[str, str] = {}
        if isinstance(step, ir.Run) and step.mounts:
            try:
                files, extra = mount_key_inputs(self, step, lambda p: self._file_digests(p, ()))
            except TlimageError as e:
                raise _at(meta, e) from None
        comps = keys.step_components(state.key, _step_obj(step, refs), env=env,
                                     platform=self.opts.platform, files=files,
                                     extra=extra)  # fmt: skip
        key = comps.key()
        self._this_build.append((key, {"step": desc, **comps.to_json()}))
        hit = None if (self.opts.no_cache or meta.force) else self.cache.lookup(key)
        cached: Layer | None = None
        if hit is not None:
            cached = None if hit.meta.get("empty") else LayerRef(hit.digest, hit.diff_id, hit.size)
        elif self._remote is not None and not meta.force and (entry := self._remote.entry(key)):
            hit = entry  # CACHED now; the layer is fetched when something reads it
            cached = None if entry.empty else Deferred(key, entry.diff_id, entry.size, desc)
        if hit is not None:
            if cached is not None:
                state.layers.append(cached)
            state.config = _after_fs_step(state.config, step)
            state.key = key
            self.cached += 1
            self.emit({"event": "step_cached", **base_event, "key": key})
            return
        if self.opts.explain:
            prev = self._previous_components(len(self._this_build) - 1)
            self.emit({"event": "explain", **base_event, "reason": keys.explain(prev, comps)})
        t0 = time.monotonic()
        from tlimage.builder.gc import scratch_name

        with tempfile.TemporaryDirectory(prefix=scratch_name("tlimage-step-"),
                                         dir=self._scratch_dir()) as tmp:  # fmt: skip
            from tlimage.cache.layer import LayerError, layer_from_upper

            try:
                if isinstance(step, ir.Run):
                    upper, opaque = self._run(step, meta, state, Path(tmp), base_event)
                elif isinstance(step, ir.Workdir):
                    upper, opaque = self._workdir(step, state, Path(tmp)), ()
                else:
                    upper, opaque = self._copy(step, meta, state, sources, Path(tmp)), ()
            except LayerError as e:  # the first unpack of a pulled layer found its config wrong
                raise _at(meta, e) from None

            info = layer_from_upper(upper, self.store, opaque_dirs=opaque)
            self.cache.put(key, info, description=desc, meta={"empty": info.entries == 0})
            if info.entries:
                adopt_upper(self.store, info.digest, upper)
        layer = None if info.entries == 0 else LayerRef(info.digest, info.diff_id, info.size)
        if layer is not None:
            state.layers.append(layer)
        state.config = _after_fs_step(state.config, step)
        state.key = key
        self.executed += 1
        self.emit({"event": "step_done", **base_event, "duration": round(time.monotonic() - t0, 3),
                   "layer": layer.digest if layer else None,
                   "size": layer.size if layer else 0})  # fmt: skip

    def _previous_components(self, position: int) -> keys.Components | None:
        if not self._previous or position >= len(self._previous):
            return None
        return keys.Components.from_json(self._previous[position].inputs)

    def _ignore(self, excludes: tuple[str, ...]) -> Any:
        from tlimage.cache.ignore import IgnoreMatcher

        return IgnoreMatcher([*self.opts.ignore, *excludes])

    def _file_digests(self, sources: list[str], excludes: tuple[str, ...]) -> dict[str, str]:
        """path -> token for every file a COPY/ADD reads (see `cache.filehash`)."""
        from tlimage.cache.filehash import digest_tree

        if not sources:
            return {}
        if self._hasher is None:
            self._hasher = self.cache.hasher()
        tree = digest_tree(self.opts.context_dir, sources, self._ignore(excludes),
                           hasher=self._hasher)  # fmt: skip
        return tree.manifest()

    def _scratch_dir(self) -> str:
        d = Path(self.store.path) / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def _lowers(self, state: _StageState) -> tuple[Path, ...]:
        return tuple(unpacked_layer(self.store, la.digest) for la in self.need(state.layers))

    # -- RUN -----------------------------------------------------------------------------

    def _run(self, step: ir.Run, meta: ir.StepMeta, state: _StageState, tmp: Path,
             base_event: dict[str, Any]) -> tuple[Path, tuple[str, ...]]:  # fmt: skip
        from tlimage.executor.base import RunRequest

        if not state.layers:
            raise _at(meta, TlimageError("RUN needs a base image with a shell; this stage starts "
                                         "FROM scratch"))  # fmt: skip
        from tlimage.builder import hostca

        lowers = self._lowers(state)
        config = state.config
        env = dict(BUILD_ENV_DEFAULTS)
        env.update(config.run_env())
        env.update(dict(step.env))
        ca = hostca.ca_layer(Path(self.store.path), self.opts.host_ca)
        if ca is not None:
            lowers = (*lowers, ca)
            for k, v in hostca.step_env().items():
                env.setdefault(k, v)
        workdir = config.resolve(step.workdir) if step.workdir else config.workdir
        argv = config.command_argv(step.command, step.shell)
        if not _is_dir_in(lowers, workdir):
            argv = ("/bin/sh", "-c", 'mkdir -p "$1" && cd "$1" && shift && exec "$@"', "sh",
                    workdir, *argv)  # fmt: skip
            workdir = "/"
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        partial = {"stdout": b"", "stderr": b""}
        redactor = Redactor(())

        def on_output(stream: str, data: bytes) -> None:
            data = redactor.feed(stream, data)
            if not data:
                return
            self.emit({"event": "build_log", **base_event, "stream": stream,
                       "data": data.decode("utf-8", "replace")})  # fmt: skip
            buf = partial[stream] + data
            *lines, partial[stream] = buf.split(b"\n")
            tail.extend(line.decode("utf-8", "replace") for line in lines)

        # Mounts (caches locked, secrets read, context views prepared) last only for this step.
        with contextlib.ExitStack() as stack:
            try:
                mounts = None
                if step.mounts:
                    step_mounts = StepMounts(self, step, tmp, lambda: self._ignore(()))
                    mounts = stack.enter_context(step_mounts)
            except TlimageError as e:
                raise _at(meta, e) from None
            if mounts is not None:
                redactor = mounts.redactor
            req = RunRequest(
                lowers=lowers,
                argv=tuple(argv),
                upper_dir=tmp / "upper",
                env=tuple(env.items()),
                user=step.user or config.user,
                workdir=workdir,
                timeout=self.opts.step_timeout,
                network=step.network != "none",
                mounts=mounts.host if mounts is not None else (),
            )
            try:
                result = self.executor.run(req, on_output)
            except ExecutorError as e:  # could not run: time-out, bad user or workdir, boot
                raise _at(meta, e) from None
            finally:
                for stream in ("stdout", "stderr"):
                    if rest := redactor.flush(stream):
                        self.emit({"event": "build_log", **base_event, "stream": stream,
                                   "data": rest.decode("utf-8", "replace")})  # fmt: skip
                        partial[stream] += rest
        if result.exit_code != 0:
            for rest in partial.values():
                if rest:
                    tail.append(rest.decode("utf-8", "replace"))
            from tlimage.builder.gc import nearly_full

            full = nearly_full(tmp)
            raise StepFailed(
                f"{describe(step, 60)} failed with exit code {result.exit_code}"
                + (f" ({full} is full: no space left on the device)" if full else ""),
                location=meta.span.short if meta.span else None,
                span=meta.span,
                exit_code=result.exit_code,
                log_tail=tuple(tail),
                hint="free some space there, or point --cache-dir / TLIMAGE_CACHE_DIR at a "
                "bigger disk"
                if full
                else None,
            )
        return result.upper, tuple(result.opaque)

    # -- WORKDIR, COPY, ADD --------------------------------------------------------------

    def _workdir(self, step: ir.Workdir, state: _StageState, tmp: Path) -> Path:
        upper = tmp / "upper"
        upper.mkdir()
        path = state.config.resolve(step.path)
        if not state.layers or not _is_dir_in(self._lowers(state), path):
            ctx.make_parents(upper, path.strip("/"))
        return upper

    def _copy(self, step: ir.Copy | ir.Add, meta: ir.StepMeta, state: _StageState,
              sources: list[ctx.Source], tmp: Path) -> Path:  # fmt: skip
        upper = tmp / "upper"
        upper.mkdir()
        config = state.config
        dest = config.resolve(step.dest) + ("/" if step.dest.endswith("/") else "")
        lowers = self._lowers(state) if state.layers else ()
        uid, gid = _owner(step.chown, lowers, meta)
        try:
            chmod = ctx.parse_chmod(step.chmod)
            if _from_other(step) and isinstance(step, ir.Copy):
                sources = self._sources_from(step, meta, tmp)
            dest_dir = _is_dir_in(lowers, dest.rstrip("/") or "/")
            if sources:
                ctx.lay_out(upper, sources, dest, dest_is_dir_in_image=dest_dir,
                            ignored=self._ignore(step.excludes).matches, uid=uid, gid=gid, chmod=chmod,
                            unpack_archives=isinstance(step, ir.Add),
                            parents=isinstance(step, ir.Copy) and step.parents)  # fmt: skip
            for f in step.inline:
                ctx.write_inline(
                    upper,
                    dest,
                    f.name,
                    f.content,
                    f.mode,
                    uid,
                    gid,
                    dest.endswith("/") or len(step.inline) > 1 or dest_dir,
                )
        except ctx.ContextError as e:
            raise _at(meta, e) from None
        return upper

    def _sources_from(self, step: ir.Copy, meta: ir.StepMeta, tmp: Path) -> list[ctx.Source]:
        """COPY --from: the sources come from another stage's or image's filesystem."""
        from tlimage.cache.layer import apply_layer, ensure_verified
        from tlimage.cache.unpacked import merge_lowers

        assert step.from_ is not None
        if step.from_ in self.stages:
            layers = self.need(self.stages[step.from_].layers)
        else:
            layers = self.need(self.image_source(step.from_, meta).layers)
        root = tmp / "from"
        root.mkdir()
        try:  # the source's unpacked layers, linked into one tree: no decompression
            merge_lowers([unpacked_layer(self.store, la.digest) for la in layers], root)
        except OSError:  # links refused (another filesystem, protected_hardlinks): extract
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            for la in layers:
                ensure_verified(self.store, la.digest)
                with self.store.open(la.digest, verify=True) as f:
                    apply_layer(f, root)
        return ctx.select_sources(root, step.sources, ignored=self._ignore(step.excludes).matches)

    def _downloads(self, step: ir.Add, meta: ir.StepMeta) -> list[Any]:
        from tlimage.builder.fetch import fetch

        out = []
        for url in (s for s in step.sources if _is_url(s)):
            try:
                d = fetch(url, Path(self.store.root), step.checksum)
            except TlimageError as e:
                raise _at(meta, e) from None
            out.append(dataclasses.replace(d, url=url))
        return out


# -- helpers ----------------------------------------------------------------------------------


class NameTaken(BuildError):
    """A build would take a registered name from an image of another source."""

    exit_code = 2


def _at(meta: ir.StepMeta, err: TlimageError) -> TlimageError:
    """Prefix an error with the step's source location (an image reference's error carries it
    as its span: file:line:col, the line and a caret)."""
    if isinstance(err, OCIError):
        if err.span is None:
            err.span = meta.span
        return err
    if meta.span is not None and not str(err).startswith(meta.span.short):
        err.message = f"{meta.span.short}: {err.message}"
        err.args = (err.message,)
    return err


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _from_other(step: ir.Step) -> bool:
    return isinstance(step, ir.Copy) and step.from_ is not None


def _step_obj(step: ir.Step, refs: dict[str, str]) -> dict[str, Any]:
    obj = ir.step_to_obj(step)
    if isinstance(step, ir.Copy) and step.from_ in refs:
        obj["from"] = {"digest": refs[step.from_]}
    return obj


def _after_fs_step(config: ImageConfig, step: ir.Step) -> ImageConfig:
    return config.apply(step) if isinstance(step, ir.Workdir) else config


def _lookup(lowers: tuple[Path, ...], path: str) -> os.stat_result | None:
    """The top-most entry for `path` in a stack of overlay-format folders (None: absent or
    whited out)."""
    rel = path.strip("/")
    if not rel:
        return os.stat(lowers[-1]) if lowers else None
    for layer in reversed(lowers):
        # A whiteout of the path or of any parent ends the search.
        parts = rel.split("/")
        for k in range(1, len(parts) + 1):
            p = layer.joinpath(*parts[:k])
            try:
                st = os.lstat(p)
            except OSError:
                break
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None
            if k == len(parts):
                return st
    return None


def _is_dir_in(lowers: tuple[Path, ...], path: str) -> bool:
    st = _lookup(lowers, path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _owner(chown: str | None, lowers: tuple[Path, ...], meta: ir.StepMeta) -> tuple[int, int]:
    if not chown:
        return 0, 0
    user, _, group = chown.partition(":")

    def resolve(name: str, db: str) -> int:
        if name.isdigit():
            return int(name)
        from tlimage import _fs

        for layer in reversed(lowers):
            # Read inside the layer only: a link the image planted is never followed on the host.
            try:
                fd = _fs.open_file_in_root(layer, f"etc/{db}")
            except (OSError, _fs.UnsafePathError):
                continue
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    continue
                text = f.read(16 << 20).decode("utf-8", "replace")
            for line in text.splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2])
            break
        raise _at(meta, TlimageError(f"chown {chown!r}: no {'user' if db == 'passwd' else 'group'}"
                                     f" {name!r} in the image's /etc/{db}"))  # fmt: skip

    uid = resolve(user, "passwd")
    gid = resolve(group, "group") if group else uid
    return uid, gid
