"""The mounts of one RUN step: `StepMounts` prepares the `HostMount`s the executor mounts and
holds the cache-mount locks while the step runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.builder.mounts.cachemounts import cache_instance, cache_mount_dir
from tlimage.builder.mounts.context import ignored_below, make_whiteouts, mkdirs_in, resolve_in
from tlimage.builder.mounts.secrets import Redactor, secret_bytes
from tlimage.builder.mounts.spec import MountError, Source, context_rel, from_source, ssh_error
from tlimage.executor.base import HostMount

# -- preparing the mounts of one step -------------------------------------------------------------


class StepMounts:
    """`with StepMounts(builder, step, tmp, ignore) as sm:` gives `sm.host` (the executor's mounts)
    and `sm.redactor` for the step's output; cache locks are held until the block ends.

    Uses from `builder`: `opts` (context_dir, secrets, step_timeout), `store`, `stages`,
    `registry`, `cache`, `emit`, `image`. `ignore()` makes the build context's ignore
    matcher, called only when a bind from the context needs it."""

    def __init__(self, builder: Any, step: ir.Run, tmp: Path, ignore: Callable[[], Any]) -> None:
        self.builder = builder
        self.ignore = ignore
        self.step = step
        self.tmp = tmp
        self.host: tuple[HostMount, ...] = ()
        self.redactor = Redactor(())
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StepMounts:
        try:
            self._prepare()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _prepare(self) -> None:
        out: list[HostMount] = []
        secrets: list[bytes] = []
        for i, spec in enumerate(self.step.mounts):
            if spec.type == "ssh":
                if spec.required:
                    raise ssh_error(spec)
                self.builder.emit({"event": "status", "message":
                                   f"no SSH agent is forwarded into build steps; the optional ssh "
                                   f"mount at {spec.target} is left out, as BuildKit does "
                                   "without --ssh"})  # fmt: skip
                continue
            if spec.type == "tmpfs":
                out.append(HostMount.tmpfs(spec.target, spec.size))
            elif spec.type == "secret":
                data = self._secret(spec)
                if data is None:
                    continue
                secrets.append(data)
                out.append(HostMount.secret(
                    data, spec.target, env=spec.env, uid=spec.uid or 0, gid=spec.gid or 0,
                    mode=0o400 if spec.mode is None else spec.mode))  # fmt: skip
            elif spec.type == "cache":
                out.append(self._cache(spec))
            else:
                out.append(self._bind(spec, i))
        self.host = tuple(out)
        self.redactor = Redactor(secrets)

    def _secret(self, spec: ir.SecretMount) -> bytes | None:
        value = self.builder.opts.secrets.get(spec.id) if self.builder.opts.secrets else None
        if value is None:
            if spec.required:
                raise MountError(
                    f"secret {spec.id!r} is required by this step but was not given",
                    hint=f"pass it with `--secret id={spec.id},src=FILE` or "
                    f"`--secret id={spec.id},env=VAR` (BuildOptions.secrets in Python)",
                )
            return None
        return secret_bytes(spec.id, value)

    # -- bind ---------------------------------------------------------------------------------

    def _bind(self, spec: ir.BindMount, index: int) -> HostMount:
        if spec.from_ is not None:
            layers = from_source(self.builder, spec.from_).layers(self.builder)
            if not layers:  # a stage FROM scratch with no files yet
                empty = self.tmp / "mounts" / f"empty{index}"
                empty.mkdir(parents=True)
                layers = (empty,)
            return HostMount.view(layers, "/" + context_rel(spec.source).lstrip("."),
                                  spec.target, readonly=spec.readonly, stable=True)  # fmt: skip
        ctx = os.path.realpath(self.builder.opts.context_dir)
        rel = context_rel(spec.source)
        try:
            real = resolve_in(ctx, rel)
        except FileNotFoundError:
            raise MountError(f"bind mount source {spec.source!r} not found in the build "
                             f"context {ctx}") from None  # fmt: skip
        hidden = ignored_below(ctx, real, self.ignore())
        if not hidden and spec.readonly:
            return HostMount.bind(Path(ctx, real), spec.target, readonly=True)
        layers: tuple[Path, ...] = (Path(ctx),)
        if hidden:
            whiteouts = self.tmp / "mounts" / f"ignored{index}"
            make_whiteouts(Path(ctx), whiteouts, hidden)
            layers = (Path(ctx), whiteouts)
        return HostMount.view(layers, "/" + real, spec.target, readonly=spec.readonly)

    # -- cache --------------------------------------------------------------------------------

    def _cache(self, spec: ir.CacheMount) -> HostMount:
        seed: Source | None = None
        base = ""
        if spec.from_ is not None:
            seed = from_source(self.builder, spec.from_)
            base = f"from {seed.identity} source {context_rel(spec.source)}"
        elif spec.uid is not None or spec.gid is not None or spec.mode is not None:
            mode = 0o755 if spec.mode is None else spec.mode
            base = f"uid {spec.uid or 0} gid {spec.gid or 0} mode {mode:o}"
        folder = cache_mount_dir(self.builder.store.path, spec.id, base)
        data = self._stack.enter_context(
            cache_instance(folder, spec, base, seed, self.builder,
                            self.builder.opts.step_timeout))  # fmt: skip
        path = data
        if spec.source and spec.from_ is None:
            # Steps write the cache: a link they planted must not lead this host path out of it.
            path = data / mkdirs_in(str(data), context_rel(spec.source))
        return HostMount.bind(path, spec.target, readonly=spec.readonly)
