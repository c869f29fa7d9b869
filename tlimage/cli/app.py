"""Typer command tree: `tl sbx image ...` for images, `tl sbx ...` for sandboxes."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer

from tlimage.cli.options import (
    CacheDirOpt,
    InsecureRegistryOpt,
    Isolation,
    OldImageOpt,
    PlatformOpt,
    ProjectOpt,
    RegistryAuthOpt,
    deprecated_i,
    registry_config,
)

app = typer.Typer(
    name="tl",
    help="Build sandbox images from Python, TypeScript/JSON or Dockerfiles, and run sandboxes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # tlimage.cli.completion: the same flags, with an optional SHELL
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain help text: rendering help through rich costs ~150 ms of imports on every `--help`.
    rich_markup_mode=None,
)
sbx = typer.Typer(help="Sandboxes and their images.", no_args_is_help=True, rich_markup_mode=None)
image = typer.Typer(
    help="Compile, build and manage images.", no_args_is_help=True, rich_markup_mode=None
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version as v

        print(f"tl {v('tlimage')}")
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool | None,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            callback=_print_version,
            help="Print the version and exit.",
        ),
    ] = None,
) -> None:
    """Build sandbox images from Python, TypeScript/JSON or Dockerfiles, and run sandboxes.

    Conventions: `--isolation auto|microvm|namespace` for builds and sandboxes; `--json` prints
    one JSON object for a single result and NDJSON (one object a line) for streams and lists;
    times are ISO-8601 in UTC."""


def command() -> click.Command:
    """The click command `tl` runs: the Typer tree plus the completion options."""
    from tlimage.cli import completion

    cmd = typer.main.get_command(app)
    cmd.params.extend(completion.options())
    return cmd


app.add_typer(sbx, name="sbx")
sbx.add_typer(image, name="image")


class Emit(StrEnum):
    ir = "ir"
    json = "json"


IsolationOpt = Annotated[
    Isolation,
    typer.Option(
        "--isolation",
        help="Where steps run: auto (the microVM when KVM "
        "works, else namespaces), microvm or namespace.",
    ),
]
HiddenBackendOpt = Annotated[
    Isolation | None, typer.Option("--backend", hidden=True, help="Old name of --isolation.")
]


def _isolation(isolation: Isolation, backend: Isolation | None) -> Isolation:
    return backend if backend is not None and isolation is Isolation.auto else isolation


FileArg = Annotated[
    Path, typer.Argument(help="Image file: image.py, image.json, image.ts or a Dockerfile.")
]
ImageNameOpt = Annotated[
    str | None,
    typer.Option("--image-name", help="Which image of the file (when it defines several)."),
]
BuildArgOpt = Annotated[
    list[str] | None,
    typer.Option("--build-arg", help="KEY=VALUE for a Dockerfile ARG (repeatable)."),
]
TargetOpt = Annotated[
    str | None, typer.Option("--target", help="Dockerfile stage to build (default: the last).")
]


def _frontend_options(build_arg: list[str] | None, target: str | None) -> dict[str, object]:
    from tlimage.errors import TlimageError

    args: dict[str, str] = {}
    for item in build_arg or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise TlimageError(f"--build-arg {item!r}: expected KEY=VALUE")
        args[key] = value
    opts: dict[str, object] = {}
    if args:
        opts["build_args"] = args
    if target:
        opts["target"] = target
    return opts


def _load_one(file: Path, name: str | None, options: dict[str, object]):  # noqa: ANN202
    from tlimage import frontends

    if frontends.kind_of(file) != "dockerfile":
        for key in options:
            from tlimage.errors import TlimageError

            raise TlimageError(f"--{key.replace('_', '-')} applies to Dockerfiles only")
    return frontends.select(frontends.load(file, **options), name, file)


@image.command("compile")
def compile_(
    file: FileArg,
    emit: Annotated[
        Emit, typer.Option("--emit", help="ir: the IR text form; json: JSON.")
    ] = Emit.ir,
    image_name: ImageNameOpt = None,
    digests: Annotated[bool, typer.Option(help="Print each step's digest as a comment.")] = True,
    build_arg: BuildArgOpt = None,
    target: TargetOpt = None,
    old_image_name: OldImageOpt = None,
) -> None:
    """Compile an image file to the build-step IR and print it (nothing is built)."""
    from tlimage import ir

    image_name = deprecated_i(image_name, old_image_name, "tl sbx image compile", "--image-name")

    img = _load_one(file, image_name, _frontend_options(build_arg, target))
    if emit is Emit.ir:
        sys.stdout.write(ir.format_text(img, digests=digests))
    else:
        import json

        sys.stdout.write(json.dumps(ir.to_json_obj(img), indent=2, ensure_ascii=False) + "\n")


class HostCA(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print NDJSON events on stdout.")]


class Compression(StrEnum):
    zstd = "zstd"
    gzip = "gzip"


class Progress(StrEnum):
    auto = "auto"
    plain = "plain"
    tty = "tty"
    json = "json"


@image.command("create")
def create(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="An image file (image.py, image.json, image.ts, a Dockerfile) or a context folder "
            "(its Dockerfile, image.py, image.json or image.ts). Default: the current folder.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            help="The image file (any name; '-' reads a Dockerfile from stdin). "
            "The context is PATH when given, else the file's folder.",
        ),
    ] = None,
    image_name: ImageNameOpt = None,
    registered_name: Annotated[
        str | None,
        typer.Option(
            "--registered-name",
            "--name",
            "-n",
            metavar="NAME[:TAG]",
            help="Register the image under NAME[:TAG] (default: the image's name).",
        ),
    ] = None,  # fmt: skip
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            "-t",
            metavar="NAME[:TAG]",
            help="Register the image (also) as NAME[:TAG], as `docker build -t` does; repeatable.",
        ),
    ] = None,  # fmt: skip
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Register under a name that holds an image built from another "
            "source (a different file, a snapshot).",
        ),
    ] = False,
    progress: Annotated[
        Progress,
        typer.Option(
            "--progress", help="auto: colour on a terminal; plain; tty; json: NDJSON events."
        ),
    ] = Progress.auto,
    json_: Annotated[bool, typer.Option("--json", help="Same as --progress json.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step.")] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="For each cache miss, say which input changed.")
    ] = False,
    isolation: IsolationOpt = Isolation.auto,
    backend: HiddenBackendOpt = None,
    timeout: Annotated[
        float | None, typer.Option("--step-timeout", help="Seconds a step may run.")
    ] = None,
    host_ca: Annotated[
        HostCA,
        typer.Option(
            "--host-ca",
            help="Trust the host's CA bundle in RUN steps "
            "(auto: when the host uses extra CAs, e.g. a TLS proxy).",
        ),
    ] = HostCA.auto,  # fmt: skip
    project: ProjectOpt = None,
    cache_dir: CacheDirOpt = None,
    build_arg: BuildArgOpt = None,
    target: TargetOpt = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            help="A secret for RUN --mount=type=secret, as BuildKit takes "
            "it: id=NAME,src=PATH or id=NAME,env=VAR. Repeatable.",
        ),
    ] = None,  # fmt: skip
    pull: Annotated[
        bool,
        typer.Option(
            "--pull",
            help="Re-resolve registry base images (a moved tag is "
            "pulled); without it, the last resolution is reused offline.",
        ),
    ] = False,  # fmt: skip
    platform: PlatformOpt = "linux/amd64",
    insecure_registry: InsecureRegistryOpt = None,
    registry_auth: RegistryAuthOpt = None,
    push: Annotated[
        str | None,
        typer.Option("--push", help="After the build, push the image to this registry reference."),
    ] = None,  # fmt: skip
    compression: Annotated[
        Compression,
        typer.Option(
            "--compression",
            help="Layer compression of --push (gzip for clients that cannot read zstd).",
        ),
    ] = Compression.zstd,  # fmt: skip
    cache_to: Annotated[
        list[str] | None,
        typer.Option(
            "--cache-to",
            envvar="TLIMAGE_CACHE_TO",
            help="Push the build's layer cache to this registry reference (repeatable).",
        ),
    ] = None,  # fmt: skip
    cache_from: Annotated[
        list[str] | None,
        typer.Option(
            "--cache-from",
            envvar="TLIMAGE_CACHE_FROM",
            help="Reuse layers cached in this registry reference (repeatable).",
        ),
    ] = None,  # fmt: skip
    old_image_name: OldImageOpt = None,
) -> int:
    """Build an image and register it for sandboxes.

    Docker's habits: `tl sbx image create .`, `-f build.Dockerfile .`, `-f - . < Dockerfile`,
    `-t name:v1`. Names and tags are checked before any step runs (exit 2)."""
    from tlimage._paths import project_name
    from tlimage.builder import build_image, error_event
    from tlimage.builder.mounts import parse_secrets
    from tlimage.errors import TlimageError
    from tlimage.registry.db import parse_ref

    image_name = deprecated_i(image_name, old_image_name, "tl sbx image create", "--image-name")
    named = [("--registered-name", registered_name)] if registered_name else []
    for opt, value in [*named, *(("--tag", t) for t in tag or ())]:
        try:
            parse_ref(value)
        except TlimageError as e:
            raise typer.BadParameter(str(e).removeprefix("invalid image reference "),
                                     param_hint=f"'{opt}'") from None  # fmt: skip
    # The first name given is where the image goes (its tag: the image's own unless given);
    # the others are registered too.
    names = [v for _, v in [*named, *(("--tag", t) for t in tag or ())]]
    also = tuple(parse_ref(v) for v in names[1:])
    isolation = _isolation(isolation, backend)
    mode = Progress.json if json_ else progress
    if mode is Progress.json:
        from tlimage.cli.render import emit_json as emit
    else:
        from tlimage.cli.progress import StepPrinter

        emit = StepPrinter(color={Progress.plain: False, Progress.tty: True}.get(mode))
    opts = _frontend_options(build_arg, target)
    _sigterm_as_interrupt()
    try:
        with _image_source(path, file, opts) as (source, context, extra):
            result = build_image(
                source,
                image_name=image_name,
                frontend_options=opts,
                emit=emit,
                project=project_name(project),
                registered_name=names[0] if names else None,
                also_register=also,
                replace=replace,
                cache_dir=cache_dir,
                no_cache=no_cache,
                explain=explain,
                isolation=isolation.value,
                step_timeout=timeout,
                host_ca=host_ca.value,
                build_args=(opts.get("build_args") or {}),  # type: ignore[arg-type]
                secrets=parse_secrets(secret or ()),
                context_dir=context,
                pull=pull,
                platform=platform,
                registry_config=registry_config(insecure_registry, registry_auth),
                cache_to=tuple(cache_to or ()),
                cache_from=tuple(cache_from or ()),
                **extra,
            )
        if push:
            if result.record is None:
                raise TlimageError("--push needs the image registered")
            push_record(result.record, push, compression=compression.value,
                        insecure=insecure_registry,
                        auth=registry_auth, cache_dir=cache_dir,
                        json_=mode is Progress.json)  # fmt: skip
    except TlimageError as e:
        if mode is Progress.json:
            emit(error_event(e))
            return e.exit_code
        raise
    except KeyboardInterrupt:
        if json_:
            emit(error_event(TlimageError("interrupted; nothing was registered")))
        raise
    return 0


IMAGE_FILES = ("Dockerfile", "image.py", "image.json", "image.ts")


@contextmanager
def _image_source(path: Path | None, file: str | None, opts: dict[str, object]):  # noqa: ANN202
    """(image file, context folder, extra build options) from Docker-style PATH and -f: the
    context is PATH when it is a folder, else the image file's folder — never its parent."""
    from tlimage.errors import DiscoveryError
    from tlimage.frontends import kind_of

    if path is not None and not path.exists():
        raise DiscoveryError(f"{path}: no such file or folder")
    if path is not None and path.is_file():
        if file is not None:
            raise DiscoveryError(f"{path} is a file and -f {file} names another",
                                 hint="give PATH as the context folder when using -f")  # fmt: skip
        yield path, path.resolve().parent, {}
        return
    context = (path or Path(".")).resolve()
    if file == "-":
        import tempfile

        from tlimage.cache.ignore import IgnoreMatcher, find_ignore_file
        from tlimage.frontends.dockerfile.lower import default_image_name

        with tempfile.TemporaryDirectory(prefix="tlimage-stdin-") as tmp:
            df = Path(tmp) / "Dockerfile"
            df.write_bytes(sys.stdin.buffer.read())
            opts.setdefault("name", default_image_name(context / "Dockerfile"))
            found = find_ignore_file(context, context / "Dockerfile")
            ignore = tuple(IgnoreMatcher.from_file(found).patterns) if found else ()
            extra: dict[str, object] = {"source": "<stdin>"}
            if ignore:
                extra["ignore"] = ignore
            yield df, context, extra
        return
    if file is not None:
        f = Path(file)
        if not f.is_file():
            raise DiscoveryError(f"-f {file}: no such file")
        try:
            kind_of(f)
        except DiscoveryError:
            opts["kind"] = "dockerfile"  # -f names a Dockerfile whatever its name, as in Docker
        yield f, (context if path is not None else f.resolve().parent), {}
        return
    for name in IMAGE_FILES:
        if (context / name).is_file():
            yield context / name, context, {}
            return
    raise DiscoveryError(f"{path or '.'}: no image file in this folder (looked for "
                         f"{', '.join(IMAGE_FILES)})", hint="name one with -f FILE")  # fmt: skip


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops a build the way Ctrl-C does: the current step is stopped, its scratch
    removed, nothing registered (KeyboardInterrupt unwinds through every cleanup)."""
    import signal
    import threading

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


@image.command("ls")
def image_ls(
    project: ProjectOpt = None,
    json_: JsonOpt = False,
    all_: Annotated[
        bool,
        typer.Option(
            "--all", "-a", help="Include the automatic snapshot names (<sandbox id>:snap-N)."
        ),
    ] = False,
) -> None:
    """List the images registered in the project (snapshots only under the name they were
    registered with, unless --all)."""
    from tlimage._paths import project_name
    from tlimage.registry import Registry

    proj = project_name(project)
    records = [r for r in Registry().list(proj) if all_ or not _auto_snapshot(r)]
    if json_:
        from tlimage.cli.render import emit_json, iso

        for r in records:
            emit_json({"name": r.name, "tag": r.tag, "image_id": r.image_id, "size": r.size,
                       "layers": len(r.manifest.layers), "created_at": iso(r.created_at),
                       "source": r.source})  # fmt: skip
        return
    from tlimage.cli.render import size as _size
    from tlimage.cli.render import table

    table(
        ["NAME", "TAG", "IMAGE ID", "LAYERS", "SIZE", "CREATED"],
        [
            [
                r.name,
                r.tag,
                r.image_id[:12],
                str(len(r.manifest.layers)),
                _size(r.size),
                _ago(r.created_at),
            ]
            for r in records
        ],  # fmt: skip
        empty=f"no images in project {proj!r}",
    )


def _auto_snapshot(r) -> bool:  # noqa: ANN001 - an ImageRecord
    """`tl sbx snapshot` without --register names the image `<sandbox id>:snap-<n>`."""
    return (
        (r.source or "").startswith("sandbox ")
        and r.tag.startswith("snap-")
        and r.name.startswith("sb-")
    )


@image.command("describe")
def image_describe(ref: Annotated[str, typer.Argument(help="NAME[:TAG]")],
                   project: ProjectOpt = None) -> None:  # fmt: skip
    """Show a registered image: layers and config (JSON)."""
    import json

    from tlimage._paths import project_name
    from tlimage.cli.render import iso
    from tlimage.registry import Registry

    r = Registry().get(project_name(project), ref)
    doc = {
        "project": r.project, "name": r.name, "tag": r.tag, "image_id": r.image_id,
        "source": r.source, "created_at": iso(r.created_at), "base": r.manifest.base,
        "ir_digest": r.manifest.ir_digest, "size": r.size,
        "layers": [vars(layer) for layer in r.manifest.layers], "config": r.manifest.config,
    }  # fmt: skip
    print(json.dumps(doc, indent=2))


@image.command("rm")
def image_rm(refs: Annotated[list[str], typer.Argument(help="NAME[:TAG] ...")],
             project: ProjectOpt = None) -> None:  # fmt: skip
    """Remove registered names (layers stay in the cache until pruned)."""
    from tlimage._paths import project_name
    from tlimage.registry import Registry

    reg, proj = Registry(), project_name(project)
    for ref in refs:
        rec = reg.remove(proj, ref)
        print(f"removed {rec.ref}")


class ExportFormat(StrEnum):
    oci = "oci"
    docker = "docker"


@image.command("export")
def image_export(
    ref: Annotated[str, typer.Argument(help="NAME[:TAG] of a registered image.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="A folder (OCI layout) or a *.tar file.")
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="oci: an OCI image layout; docker: a docker-archive for docker/podman load.",
        ),
    ] = ExportFormat.oci,
    compression: Annotated[
        Compression,
        typer.Option(
            "--compression",
            help="Layer compression in an OCI layout (docker-archives hold plain tars).",
        ),
    ] = Compression.zstd,
    project: ProjectOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Write a registered image as an OCI image layout or a docker-archive (reproducible)."""
    from tlimage._paths import project_name
    from tlimage.builder.images import local_image
    from tlimage.cache.store import BlobStore
    from tlimage.oci.layout import export_image
    from tlimage.registry import Registry

    rec = Registry().get(project_name(project), ref)
    if fmt is ExportFormat.docker and output.suffix != ".tar":
        from tlimage.errors import TlimageError

        raise TlimageError(f"{output}: a docker-archive is a tar file; name it *.tar")
    # NAME:TAG as the layout's ref name, as `podman save` and `skopeo copy oci-archive:F:N:T`
    # write it: `podman load` then names the image localhost/NAME:TAG (with the tag alone, it
    # named it localhost/TAG:latest).
    digest = export_image(BlobStore(cache_dir), local_image(rec), output, fmt=fmt.value,
                          ref_name=f"{rec.name}:{rec.tag}",
                          repo_tag=f"localhost/{rec.name}:{rec.tag}",
                          compression=compression.value)  # fmt: skip
    print(f"exported {rec.ref} to {output} ({fmt.value}, {digest})")


def push_record(
    rec,
    dest: str,
    *,
    compression: str,
    insecure: list[str] | None,
    auth: list[str] | None,
    cache_dir: Path | None,
    json_: bool = False,
) -> str:  # noqa: ANN001
    """Push a registered image; prints what happened; returns the manifest digest."""
    from tlimage.builder.images import local_image
    from tlimage.cache.store import BlobStore
    from tlimage.oci.push import push

    def progress(ev: dict) -> None:
        if json_:
            from tlimage.cli.render import emit_json

            emit_json(ev)
        elif ev["event"] == "push_blob":
            print(f"  {ev['status']:9} {ev['blob'][:19]}… {ev['size'] / 1e6:.1f} MB",
                  file=sys.stderr)  # fmt: skip

    stats = push(BlobStore(cache_dir), local_image(rec), dest, compression=compression,
                 config=registry_config(insecure, auth), progress=progress)  # fmt: skip
    if not json_:
        print(f"pushed {rec.ref} to {dest}@{stats.digest} ({len(stats.uploaded)} uploaded, "
              f"{len(stats.mounted)} mounted, {len(stats.existing)} already there, "
              f"{stats.bytes / 1e6:.1f} MB in {stats.duration:.1f}s)")  # fmt: skip
    return stats.digest


@image.command("push")
def image_push(
    ref: Annotated[str, typer.Argument(help="NAME[:TAG] of a registered image.")],
    dest: Annotated[str, typer.Argument(help="Registry reference, e.g. ghcr.io/org/app:1.0")],
    compression: Annotated[
        Compression,
        typer.Option(
            "--compression", help="Layer compression (gzip for clients that cannot read zstd)."
        ),
    ] = Compression.zstd,
    insecure_registry: InsecureRegistryOpt = None,
    registry_auth: RegistryAuthOpt = None,
    project: ProjectOpt = None,
    cache_dir: CacheDirOpt = None,
    json_: JsonOpt = False,
) -> int:
    """Upload a registered image to a registry (unchanged layers are not sent)."""
    from tlimage._paths import project_name
    from tlimage.errors import TlimageError
    from tlimage.registry import Registry

    try:
        rec = Registry().get(project_name(project), ref)
        push_record(rec, dest, compression=compression.value, insecure=insecure_registry,
                    auth=registry_auth, cache_dir=cache_dir, json_=json_)  # fmt: skip
    except TlimageError as e:
        if not json_:
            raise
        from tlimage.builder import error_event
        from tlimage.cli.render import emit_json

        emit_json(error_event(e))  # a --json caller reads the failure as an event too
        return e.exit_code
    return 0


@image.command("import")
def image_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="An OCI layout (folder or tar, PATH[:NAME] picks "
            "an image), a docker-archive, or a rootfs tarball."
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", "-n", help="NAME[:TAG] to register it under (default: the file's name)."
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Register under a name that holds an image of another "
            "source (built from a file, a snapshot, another archive).",
        ),
    ] = False,  # fmt: skip
    project: ProjectOpt = None,
    cache_dir: CacheDirOpt = None,
    platform: PlatformOpt = "linux/amd64",
) -> None:
    """Register an image from an OCI layout, a docker-archive or a plain rootfs tarball."""
    import re

    from tlimage._paths import project_name
    from tlimage.builder.images import register_pulled
    from tlimage.cache.cache import LayerCache
    from tlimage.oci.layout import import_image
    from tlimage.registry.db import parse_ref

    pick = None
    text = str(path)
    if not path.exists() and ":" in text:
        # PATH:NAME, where NAME may hold a colon itself (app.tar:app:v1): the first colon
        # whose left side exists splits them.
        cut = next((i for i, c in enumerate(text) if c == ":" and Path(text[:i]).exists()),
                   text.rindex(":"))  # fmt: skip
        path, pick = Path(text[:cut]), text[cut + 1 :]
    default = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name.split(".")[0]).strip("-.") or "imported"
    if pick and ":" in (last := pick.rsplit("/", 1)[-1]):
        default, pick_tag = last.split(":", 1)  # NAME:TAG picked: registered as NAME:TAG
    else:
        pick_tag = pick.rsplit("/", 1)[-1] if pick else None
    img_name, tag = parse_ref(name or (default + (f":{pick_tag}" if pick_tag else "")))
    with LayerCache(cache_dir) as cache, cache.session(purpose="import"):
        img = import_image(cache, path, ref_name=pick, platform=platform)
        rec = register_pulled(img, project_name(project), img_name, tag,
                              source=str(path.resolve()), replace=replace)  # fmt: skip
    print(f"imported {path} as {rec.ref} ({len(img.layers)} layers, image {rec.image_id[:12]})")


@image.command("bases")
def image_bases(cache_dir: CacheDirOpt = None, json_: JsonOpt = False) -> None:
    """List the base images tlimage builds itself: what each holds, built or not, its size and
    layer digest (`FROM NAME@DIGEST` pins it)."""
    from tlimage.cli.render import emit_json, size, table
    from tlimage.errors import TlimageError
    from tlimage.executor import bases, catalog

    default = catalog.default_base()
    rows = []
    for spec in catalog.CATALOG:
        row: dict[str, object] = {
            "name": spec.name, "distribution": spec.distribution, "suite": spec.suite,
            "variant": spec.variant, "init": spec.init, "packages": list(spec.packages),
            "holds": spec.summary, "default": spec.name == default, "available": True,
            "built": False, "size": None, "digest": None, "note": None,
        }  # fmt: skip
        try:
            info = bases.base_info(spec)
            row["suite"] = info.get("suite", spec.suite)
            key = bases.base_key(spec, info)
        except TlimageError as e:
            row["available"], row["note"] = False, e.message
            rows.append(row)
            continue
        tree = bases.built_tree(spec.name, cache_dir)
        row["built"] = tree is not None
        if tree is not None:
            from tlimage.cache.cache import LayerCache

            with LayerCache(cache_dir) as c:
                rec = c.lookup(f"base:{spec.name}:{key}")
            if rec is not None:
                row["size"], row["digest"] = rec.size, rec.digest
        rows.append(row)
    if json_:
        for row in rows:
            emit_json(row)
        return
    table(["NAME", "DISTRIBUTION", "SUITE", "VARIANT", "INIT", "BUILT", "SIZE", "HOLDS"],
          [[r["name"] + (" (default)" if r["default"] else ""), r["distribution"],
            r["suite"] or "-", r["variant"], r["init"],
            "yes" if r["built"] else ("no" if r["available"] else "unavailable"),
            size(r["size"]) if r["size"] else "-", r["holds"]] for r in rows])  # fmt: skip
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r["note"]:
            note = str(r["note"]).splitlines()[0].removeprefix(f"{r['name']} ")
            notes.setdefault(note, []).append(str(r["name"]))
    for note, names in notes.items():
        print(f"{', '.join(names)}: {note}", file=sys.stderr)


@image.command("schema")
def image_schema() -> None:
    """Print the JSON Schema of image documents (what the TypeScript SDK exports)."""
    from tlimage.frontends.jsonform import schema_text

    sys.stdout.write(schema_text())


@image.command("prune")
def image_prune(
    keep_storage: Annotated[
        str, typer.Option("--keep-storage", help="Keep at most this much (e.g. 10GB); 0: all.")
    ] = "0",
    cache_dir: CacheDirOpt = None,
) -> None:
    """Remove cached layers, least recently used first, then microVM disk images, base trees and
    guest kits; registered images and live sandboxes keep what they use. Also sweeps what
    crashed builds left (scratch folders, microVM scratch disks, lock notes)."""
    from tlimage.builder.gc import prune
    from tlimage.cache.cache import parse_size
    from tlimage.cli.render import size
    from tlimage.runtime import live_cache_paths, live_layer_digests

    r, ev = prune(cache_dir, parse_size(keep_storage), keep_digests=live_layer_digests(),
                  keep_paths=live_cache_paths())  # fmt: skip
    print(f"removed {r.removed_entries} cache entries, {r.removed_blobs} layers, "
          f"{ev.entries} executor images, trees and kits, "
          f"freed {size(r.freed_bytes + ev.freed_bytes)}; "
          f"{size(r.remaining_bytes + ev.remaining_bytes)} remain")  # fmt: skip


cache = typer.Typer(help="Inspect the layer cache.", no_args_is_help=True, rich_markup_mode=None)
image.add_typer(cache, name="cache")
cache.command("prune", help="Same as `tl sbx image prune`.")(image_prune)


@cache.command("ls")
def cache_ls(
    cache_dir: CacheDirOpt = None,
    json_: JsonOpt = False,
    folders: Annotated[
        bool,
        typer.Option(
            "--folders",
            help="List the folders and databases tlimage keeps, with their sizes, instead.",
        ),
    ] = False,
) -> None:
    """List cached layers, most recently used first."""
    from tlimage.cache.cache import LayerCache
    from tlimage.cli.render import emit_json, iso, size, table

    if folders:
        _cache_folders(cache_dir, json_)
        return
    with LayerCache(cache_dir) as c:
        entries = c.ls()
    if json_:
        for e in entries:
            emit_json({"key": e.key, "digest": e.digest, "size": e.size, "step": e.description,
                       "last_used": iso(e.last_used)})  # fmt: skip
        return
    table(["KEY", "LAYER", "SIZE", "LAST USED", "STEP"],
          [[e.key[:12], e.digest.split(":")[-1][:12], size(e.size), _ago(e.last_used),
            e.description[:60]] for e in entries], empty="the cache is empty")  # fmt: skip


def _cache_folders(cache_dir: Path | None, json_: bool) -> None:
    """Each `_layout` bucket: where it is and how much it takes."""
    from tlimage import _layout
    from tlimage._paths import state_dir
    from tlimage.cache.store import resolve_cache_root
    from tlimage.cli.render import emit_json, size, table

    roots = {"cache": resolve_cache_root(cache_dir), "state": state_dir()}
    rows = []
    for b in _layout.BUCKETS:
        path = b.under(roots[b.root])
        used, items = _du(path)
        if json_:
            emit_json({"bucket": b.name, "path": str(path), "size": used, "entries": items,
                       "evictable": b.evictable, "what": b.what})  # fmt: skip
        rows.append([b.name, size(used) if path.exists() else "-", str(items), str(path), b.what])
    if not json_:
        table(["BUCKET", "SIZE", "ENTRIES", "PATH", "WHAT"], rows, empty="")


def _du(path: Path) -> tuple[int, int]:
    """(bytes on disk, entries directly inside) of a file or folder; nested buckets count in
    their parent too."""
    import os

    if not path.exists():
        return 0, 0
    if not path.is_dir():
        return path.stat().st_blocks * 512, 1
    used = 0
    for d, _ds, fs in os.walk(path):
        for f in fs:
            try:
                used += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return used, sum(1 for _ in path.iterdir())


@image.command("parse")
def image_parse(
    file: Annotated[Path, typer.Argument(help="A Dockerfile.")],
    dump: Annotated[bool, typer.Option("--dump", help="BuildKit's s-expression dump.")] = True,
) -> None:
    """Parse a Dockerfile and print the syntax tree (BuildKit's dump format)."""
    from tlimage.frontends.dockerfile.parser import dump as dump_ast
    from tlimage.frontends.dockerfile.parser import parse_file

    ast = parse_file(str(file))
    sys.stdout.write(dump_ast(ast) + "\n")


def _ago(ts: float) -> str:
    import time

    s = max(0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


@app.command("version")
def version() -> None:
    """Print tlimage's version."""
    from importlib.metadata import version as v

    print(v("tlimage"))


@sbx.command("start")
def start(refs: Annotated[list[str], typer.Argument(help="Names of terminated sandboxes.")],
          project: ProjectOpt = None) -> None:  # fmt: skip
    """Start terminated named sandboxes again from their kept files; prints each id."""
    from tlimage.runtime import Sandbox

    for ref in refs:
        print(Sandbox.get(ref, project=project).start().id)


@sbx.command("doctor")
def doctor(cache_dir: CacheDirOpt = None,
           json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
           fix: Annotated[bool, typer.Option("--fix", help="End stray sandboxes (running "
                                             "with no record) and remove their cgroups.")] = False,
           ) -> int:  # fmt: skip
    """Report what this machine can do: KVM, cgroups, user namespaces, seccomp, the network
    helper, base images and the cache size, and sandboxes of this state folder that run with
    no record (exit 1 when something needed is missing)."""
    from tlimage.cli import doctor as d

    checks = d.run(cache_dir, fix)
    if json_:
        import json

        print(json.dumps({"checks": checks}))
    else:
        from tlimage.cli.render import table

        table(["CHECK", "STATUS", "DETAIL"], [[c["check"], c["status"], c["detail"]]
                                              for c in checks])  # fmt: skip
    return 1 if any(c["status"] == d.FAIL for c in checks) else 0


def _sandbox_commands() -> None:
    """`tl sbx new/ls/exec/cp/snapshot/clone/suspend/resume/terminate` (tlimage/cli/sandbox.py)."""
    from tlimage.cli.sandbox import register

    register(sbx)


_sandbox_commands()


def _secret_commands() -> None:
    """`tl secrets set/ls/rm` (tlimage/cli/secrets.py)."""
    from tlimage.cli.secrets import secrets_app

    app.add_typer(secrets_app, name="secrets")


_secret_commands()
