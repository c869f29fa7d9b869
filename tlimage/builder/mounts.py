"""RUN mounts (`RUN --mount=type=cache|secret|bind|tmpfs|ssh`), with BuildKit's semantics.

The IR's typed mounts (`ir.BindMount`, `ir.CacheMount`, ...) come with BuildKit's defaults
filled in by the front ends (`frontends.mounts`). For each RUN the builder asks two things of this
module:

- `key_inputs(builder, step)`: what the mounts add to the step's cache key beyond their own
  definition (which is in the step already). A bind from the build context adds the digests of
  the files it shows (as COPY does); a bind or cache seed `from=` another stage or image adds that
  stage's chain key or that image's id. Caches, tmpfs and secrets add nothing: a secret's value
  never enters a key, and a cache's contents are by definition not an input.
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

Secrets come from `BuildOptions.secrets` (`id -> Path | bytes`, CLI `--secret`). A step's output
is passed through `Redactor`, so a secret the step prints shows as `****` in the logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlimage import _layout, ir
from tlimage.errors import BuildError
from tlimage.executor.base import HostMount

CACHE_MOUNTS = Path(_layout.CACHE_MOUNTS.path).relative_to(_layout.LAYERS.path)  # below the store
MAX_SECRET_SIZE = 500 * 1024  # BuildKit's limit for one secret
MASK = b"****"
MIN_MASKED = 4  # shorter secrets are not masked in logs: that would garble ordinary output


class MountError(BuildError):
    """A RUN mount cannot be set up (bad option, missing secret, missing source)."""


# -- what the mounts add to a key -----------------------------------------------------------------


def key_inputs(builder: Any, step: ir.Run) -> tuple[dict[str, str], dict[str, str]]:
    """(files, extra) for `keys.step_components`: context files a bind shows (path -> token) and,
    per mount `from=` a stage or image, that source's identity."""
    files: dict[str, str] = {}
    extra: dict[str, str] = {}
    for spec in step.mounts:
        if spec.type == "ssh" and spec.required:
            raise _ssh_error(spec)
        if spec.type == "bind" and spec.from_ is None:
            files.update(builder._file_digests([_context_rel(spec.source)], ()))
        if spec.type in ("bind", "cache") and spec.from_ is not None:
            extra[f"mount {spec.target} from"] = _from_source(builder, spec.from_).identity
    return files, extra


def _ssh_error(spec: ir.SshMount) -> MountError:
    return MountError(
        f"RUN --mount=type=ssh (id {spec.id!r}, required) needs an SSH agent, and tlimage does "
        "not forward one into build steps",
        hint="fetch with a token instead: --mount=type=secret,id=token,env=GIT_TOKEN and "
        "`--secret id=token,env=GIT_TOKEN`",
    )


def _context_rel(source: str) -> str:
    rel = posixpath.normpath("/" + source).lstrip("/")
    return rel or "."


@dataclass(frozen=True)
class _Source:
    """A stage or image a mount reads `from=`: its layer digests (bottom first) and its
    identity for keys (a built stage's chain key, an image's id, a seed base's layer digest)."""

    digests: tuple[str, ...]
    identity: str

    def layers(self, builder: Any) -> tuple[Path, ...]:
        """The layers as overlay-style folders, unpacked on first use."""
        from tlimage.cache.unpacked import unpacked_layer

        return tuple(unpacked_layer(builder.store, d) for d in self.digests)


def _from_source(builder: Any, name: str) -> _Source:
    if name in builder.stages:
        state = builder.stages[name]
        return _Source(tuple(la.digest for la in state.layers), f"stage {name} {state.key}")
    if name in builder.image.stage_names:
        raise MountError(f"mount from stage {name!r}: that stage has not been built")
    # A registered image, a seed base, or a registry image (pulled; its digest is the identity).
    src = builder.image_source(name)
    return _Source(tuple(la.digest for la in src.layers), f"image {src.desc}")


# -- preparing the mounts of one step -------------------------------------------------------------


class StepMounts:
    """`with StepMounts(builder, step, tmp) as sm:` gives `sm.host` (the executor's mounts)
    and `sm.redactor` for the step's output; cache locks are held until the block ends.

    Uses from `builder`: `opts` (context_dir, secrets, step_timeout), `store`, `stages`,
    `registry`, `cache`, `emit`, `_ignore(())`, `image`."""

    def __init__(self, builder: Any, step: ir.Run, tmp: Path) -> None:
        self.builder = builder
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
                    raise _ssh_error(spec)
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
            layers = _from_source(self.builder, spec.from_).layers(self.builder)
            if not layers:  # a stage FROM scratch with no files yet
                empty = self.tmp / "mounts" / f"empty{index}"
                empty.mkdir(parents=True)
                layers = (empty,)
            return HostMount.view(layers, "/" + _context_rel(spec.source).lstrip("."),
                                  spec.target, readonly=spec.readonly, stable=True)  # fmt: skip
        ctx = os.path.realpath(self.builder.opts.context_dir)
        rel = _context_rel(spec.source)
        try:
            real = resolve_in(ctx, rel)
        except FileNotFoundError:
            raise MountError(f"bind mount source {spec.source!r} not found in the build "
                             f"context {ctx}") from None  # fmt: skip
        hidden = ignored_below(ctx, real, self.builder._ignore(()))
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
        seed: _Source | None = None
        base = ""
        if spec.from_ is not None:
            seed = _from_source(self.builder, spec.from_)
            base = f"from {seed.identity} source {_context_rel(spec.source)}"
        elif spec.uid is not None or spec.gid is not None or spec.mode is not None:
            mode = 0o755 if spec.mode is None else spec.mode
            base = f"uid {spec.uid or 0} gid {spec.gid or 0} mode {mode:o}"
        folder = cache_mount_dir(self.builder.store.path, spec.id, base)
        data = self._stack.enter_context(
            _cache_instance(folder, spec, base, seed, self.builder,
                            self.builder.opts.step_timeout))  # fmt: skip
        path = data
        if spec.source and spec.from_ is None:
            # Steps write the cache: a link they planted must not lead this host path out of it.
            path = data / mkdirs_in(str(data), _context_rel(spec.source))
        return HostMount.bind(path, spec.target, readonly=spec.readonly)


def cache_mounts_root(store_path: Path) -> Path:
    return Path(store_path) / CACHE_MOUNTS


def cache_mount_dir(store_path: Path, cache_id: str, base: str = "") -> Path:
    import xxhash

    h = xxhash.xxh3_128(b"tlimage-cache-mount\0" + cache_id.encode() + b"\0" + base.encode())
    return cache_mounts_root(store_path) / h.hexdigest()


@contextlib.contextmanager
def _cache_instance(folder: Path, spec: ir.CacheMount, base: str, seed: _Source | None, builder: Any,
                    timeout: float | None) -> Iterator[Path]:  # fmt: skip
    """Lock and return (creating it if needed) the instance of a cache mount this step uses."""
    folder.mkdir(parents=True, exist_ok=True)
    label = folder / "id"
    if not label.exists():
        _write_atomic(label, f"{spec.id}\n{base}\n".encode())
    n = 0
    while True:
        fd = os.open(folder / f"{n}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if spec.sharing == "private":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                n += 1
                continue
        break
    try:
        if spec.sharing != "private":
            op = fcntl.LOCK_SH if spec.sharing == "shared" else fcntl.LOCK_EX
            _flock_wait(fd, op, f"cache mount {spec.id!r} ({spec.sharing}), in use by another "
                        "build", builder.emit, timeout)  # fmt: skip
        data = folder / str(n)
        if not data.is_dir():
            _create_instance(folder, data, spec, seed, builder)
        yield data
    finally:
        os.close(fd)  # releases the flock


def _flock_wait(fd: int, op: int, what: str, emit: Callable[[dict], None],
                timeout: float | None) -> None:  # fmt: skip
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not told:
            emit({"event": "status", "message": f"waiting for {what}"})
            told = True
        if deadline is not None and time.monotonic() >= deadline:
            raise MountError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _create_instance(folder: Path, data: Path, spec: ir.CacheMount, seed: _Source | None,
                     builder: Any) -> None:  # fmt: skip
    """Make instance `data` whole or not at all: built beside it, renamed into place under
    `create.lock` so that two builds never both create it."""
    fd = os.open(folder / "create.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if data.is_dir():
            return
        tmp = folder / f".tmp-{os.getpid()}-{data.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if seed is not None:
                _seed(tmp, seed, spec.source, builder.store)
            else:
                tmp.mkdir()
                os.chown(tmp, spec.uid or 0, spec.gid or 0)
                os.chmod(tmp, 0o755 if spec.mode is None else spec.mode)
            os.rename(tmp, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)


def _seed(dest: Path, seed: _Source, source: str, store: Any) -> None:
    """`dest` := a copy of the folder `source` of the stage or image `seed` (a cache mount's
    `from=`). The layers are extracted afresh: the cache will be written to, so nothing may be
    shared with the stored layers."""
    from tlimage.cache.layer import apply_layer

    root = dest.with_name(dest.name + "-root")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        for digest in seed.digests:
            with store.open(digest, verify=True) as f:
                apply_layer(f, root)
        rel = _context_rel(source)
        try:
            src = Path(root, resolve_in(str(root), rel)) if rel != "." else root
        except FileNotFoundError:
            raise MountError(f"cache mount source {source!r} not found in its from= "
                             "stage") from None  # fmt: skip
        if not src.is_dir():
            raise MountError(f"cache mount source {source!r} is not a directory")
        os.rename(src, dest)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def clear_cache_mounts(cache_dir: Path | None = None, *, timeout: float | None = None) -> int:
    """Delete every cache mount; returns the bytes freed. Holds the cache's exclusive lock, so
    no build is using one meanwhile."""
    from tlimage.cache.cache import LayerCache

    with LayerCache(cache_dir) as cache:
        root = cache_mounts_root(cache.store.path)
        kw = {} if timeout is None else {"timeout": timeout}
        with cache.lock.exclusive(purpose="clear cache mounts", **kw):
            freed = _du(root)
            shutil.rmtree(root, ignore_errors=True)
            return freed


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# -- the build context --------------------------------------------------------------------------


def resolve_in(root: str, rel: str) -> str:
    """`rel` resolved inside `root` as if it were `/` (symlinks included, none leaving it);
    returns the real relative path ("" for the root). Raises FileNotFoundError."""
    from tlimage._fs import resolve_in_root

    try:
        return resolve_in_root(root, rel)
    except FileNotFoundError:
        raise
    except OSError:  # a symlink loop
        raise FileNotFoundError(rel) from None


def mkdirs_in(root: str, rel: str) -> str:
    """`mkdir -p rel` inside `root`, with symlinks resolved inside `root` as `resolve_in` does;
    returns the real relative path of the folder."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for k in range(1, len(parts) + 1):
        try:
            resolve_in(root, "/".join(parts[:k]))
        except FileNotFoundError:
            parent = resolve_in(root, "/".join(parts[: k - 1]))
            new = os.path.join(root, parent, parts[k - 1])
            if os.path.lexists(new):
                raise MountError(f"cache mount source {rel!r}: {'/'.join(parts[:k])} is a link "
                                 "to nothing inside the cache") from None  # fmt: skip
            os.mkdir(new)
    real = resolve_in(root, "/".join(parts))
    if not os.path.isdir(os.path.join(root, real)):
        raise MountError(f"cache mount source {rel!r} is not a directory in the cache")
    return real


def ignored_below(ctx: str, real: str, matcher: Any) -> list[str]:
    """Paths under the context folder `real` (relative to the context) that the ignore rules
    hide, each the top of a hidden subtree. Same rules as `cache.filehash` (a folder excluded
    with `!` exceptions below it stays, showing only the exceptions)."""
    if not matcher:
        return []
    out: list[str] = []

    def walk(rel: str, hits: list[bool] | None) -> bool:
        any_visible = False
        path = os.path.join(ctx, rel) if rel else ctx
        with os.scandir(path) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            c_rel = f"{rel}/{child.name}" if rel else child.name
            excluded, c_hits = matcher.evaluate(c_rel, hits)
            if child.is_dir(follow_symlinks=False):
                if excluded and not matcher.has_exclusions:
                    out.append(c_rel)
                    continue
                mark = len(out)
                inner = walk(c_rel, c_hits)
                if excluded and not inner:
                    del out[mark:]
                    out.append(c_rel)
                    continue
                any_visible = True
            elif excluded:
                out.append(c_rel)
            else:
                any_visible = True
        return any_visible

    if not os.path.isdir(os.path.join(ctx, real)):
        return []
    hits = matcher.evaluate(real, None)[1] if real else None
    walk(real, hits)
    return out


def make_whiteouts(ctx: Path, dest: Path, hidden: Iterable[str]) -> None:
    """An overlay-style layer that hides `hidden` (context-relative paths) when stacked over
    `ctx`. Its folders copy the context's mode and owner: in an overlay the top layer's folder
    attributes win."""
    dest.mkdir(parents=True)
    for rel in hidden:
        parts = rel.split("/")
        for k in range(1, len(parts)):
            d = dest.joinpath(*parts[:k])
            if not d.is_dir():
                d.mkdir()
                st = os.lstat(ctx.joinpath(*parts[:k]))
                os.chown(d, st.st_uid, st.st_gid)
                os.chmod(d, stat.S_IMODE(st.st_mode))
        os.mknod(dest / rel, stat.S_IFCHR | 0o000, 0)
    st = os.lstat(ctx)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))


# -- secrets ------------------------------------------------------------------------------------


def secret_bytes(sid: str, value: Path | bytes | str) -> bytes:
    """A secret's bytes from `BuildOptions.secrets`. Errors never show the value."""
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, os.PathLike):
        try:
            with open(value, "rb") as f:
                data = f.read(MAX_SECRET_SIZE + 1)
        except OSError as e:
            raise MountError(f"secret {sid!r}: cannot read {os.fspath(value)}: "
                             f"{e.strerror}") from None  # fmt: skip
    else:
        raise MountError(f"secret {sid!r}: expected bytes (the value) or a Path (a file), got "
                         f"{type(value).__name__}")  # fmt: skip
    if len(data) > MAX_SECRET_SIZE:
        raise MountError(f"secret {sid!r} is larger than {MAX_SECRET_SIZE // 1024} KiB")
    return data


def parse_secret(text: str) -> tuple[str, Path | bytes]:
    """One `--secret` value as buildx reads it: `id=NAME[,src|source=PATH][,env=VAR]
    [,type=file|env]`. With neither src nor env, the variable NAME if set, else the file NAME.
    An `env=` secret is read from this process's environment now."""
    fields: dict[str, str] = {}
    for field in (f.strip() for f in text.split(",")):
        if not field:
            continue
        key, eq, value = field.partition("=")
        key = key.strip().lower()
        if not eq:
            raise MountError(f"--secret {text!r}: invalid field {field!r}, must be key=value")
        if key == "src":
            key = "source"
        if key not in ("id", "source", "env", "type"):
            raise MountError(f"--secret {text!r}: unexpected key {key!r}; allowed: id, src, "
                             "env, type")  # fmt: skip
        fields[key] = value
    typ = fields.get("type")
    if typ not in (None, "file", "env"):
        raise MountError(f"--secret {text!r}: unsupported type {typ!r}; allowed: file, env")
    sid = fields.get("id", "")
    src, env = fields.get("source", ""), fields.get("env", "")
    if typ == "env" and not env:
        env, src = src, ""
    if not sid:
        sid = src or env
    if not sid:
        raise MountError(f"--secret {text!r}: an id is required (id=NAME)")
    if not src and not env:
        if sid in os.environ:
            env = sid
        else:
            src = sid
    if env:
        if env not in os.environ:
            raise MountError(f"--secret {text!r}: environment variable {env} is not set")
        return sid, os.environb[env.encode()]
    return sid, Path(src).expanduser()


def parse_secrets(texts: Iterable[str]) -> dict[str, Path | bytes]:
    return dict(parse_secret(t) for t in texts)


class Redactor:
    """Masks secret values in a step's output streams. A chunk's tail that could begin a secret
    is held back until the next chunk (or `flush`), so a value split across chunks is caught
    too. Values shorter than MIN_MASKED are not masked; a value is masked without its trailing
    newline (the log keeps its lines), and each line of a multi-line value also on its own."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        values: set[bytes] = set()
        for s in secrets:
            for v in (s.rstrip(b"\r\n"), *s.splitlines()):
                if len(v.strip()) >= MIN_MASKED:
                    values.add(v)
        self.values = sorted(values, key=len, reverse=True)
        self._pending: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def feed(self, stream: str, data: bytes) -> bytes:
        if not self.values:
            return data
        buf = self._pending.pop(stream, b"") + data
        for v in self.values:
            buf = buf.replace(v, MASK)
        cut = len(buf)
        longest = len(self.values[0])
        for i in range(max(0, len(buf) - longest + 1), len(buf)):
            tail = buf[i:]
            if any(v.startswith(tail) for v in self.values):
                cut = i
                break
        if cut < len(buf):
            self._pending[stream] = buf[cut:]
        return buf[:cut]

    def flush(self, stream: str) -> bytes:
        return self._pending.pop(stream, b"")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


__all__ = [
    "MountError",
    "Redactor",
    "StepMounts",
    "cache_mount_dir",
    "clear_cache_mounts",
    "key_inputs",
    "parse_secret",
    "parse_secrets",
    "secret_bytes",
]
