"""RUN mounts (`RUN --mount=type=cache|secret|bind|tmpfs|ssh`), with BuildKit's semantics.

The IR's typed mounts (`ir.BindMount`, `ir.CacheMount`, ...) come with BuildKit's defaults
filled in by the front ends (`frontends.mounts`). For each RUN the builder asks two things of this
module:

- `key_inputs(builder, step, file_digests)`: what the mounts add to the step's cache key beyond
  their own definition (which is in the step already). A bind from the build context adds the
  digests of the files it shows (as COPY does, through the builder's `file_digests`); a bind or
  cache seed `from=` another stage or image adds that stage's chain key or that image's id.
  Caches, tmpfs and secrets add nothing: a secret's value never enters a key, and a cache's
  contents are by definition not an input.
- `StepMounts(builder, step, tmp)`: a context manager that prepares the `HostMount`s the
  executor mounts for the step and holds the cache-mount locks while it runs.

Nothing a mount shows ends up in a layer: the executor mounts it over the step's root and
removes any mount point it had to create (see `executor.base`).

Cache mounts live on the host, one folder per cache:

    <cache root>/layers-v1/mounts/cache/<xxh3 of the identity>/
        id          the id (and base) in plain text, for people
        create.lock held exclusively while an instance is being made
        <n>.lock    flock: shared by `sharing=shared` users, exclusive for `locked`/`private`
        <n>/        instance n's contents (0 unless `private` needed more)

The identity is the id plus what the cache starts from (BuildKit keys a cache by its id and its
base): the same id with another `uid/gid/mode` or `from=` is another cache. `shared` users use
instance 0 together; `locked` waits for sole use of instance 0; `private` takes the first instance
nobody holds, making a new one when all are busy. `tl sbx image prune` leaves cache mounts alone
(they are not layers and have no LRU); `clear_cache_mounts` empties them all.

The package, along its jobs: `spec` (MountError, `key_inputs`, the `from=` sources), `step`
(`StepMounts`), `cachemounts` (the cache folders, instances and locks), `context` (paths resolved
inside a root, ignored paths, whiteouts) and `secrets` (`--secret`, `Redactor`).

Secrets come from `BuildOptions.secrets` (`id -> Path | bytes`, CLI `--secret`). A step's output
is passed through `Redactor`, so a secret the step prints shows as `****` in the logs.
"""

from tlimage.builder.mounts.cachemounts import (
    CACHE_MOUNTS,
    cache_mount_dir,
    cache_mounts_root,
    clear_cache_mounts,
)
from tlimage.builder.mounts.context import ignored_below, make_whiteouts, mkdirs_in, resolve_in
from tlimage.builder.mounts.secrets import (
    MASK,
    MAX_SECRET_SIZE,
    MIN_MASKED,
    Redactor,
    parse_secret,
    parse_secrets,
    secret_bytes,
)
from tlimage.builder.mounts.spec import MountError, key_inputs
from tlimage.builder.mounts.step import StepMounts

__all__ = [
    "CACHE_MOUNTS",
    "MASK",
    "MAX_SECRET_SIZE",
    "MIN_MASKED",
    "MountError",
    "Redactor",
    "StepMounts",
    "cache_mount_dir",
    "cache_mounts_root",
    "clear_cache_mounts",
    "ignored_below",
    "key_inputs",
    "make_whiteouts",
    "mkdirs_in",
    "parse_secret",
    "parse_secrets",
    "resolve_in",
    "secret_bytes",
]
