"""`tl sbx new|ls|info|exec|cp|snapshot|clone|suspend|resume|terminate|rm|logs`: sandboxes.

A thin layer over `tlimage.runtime`: parse arguments, call the API, render. Every command
reconciles the runtime state with the host first (through the API), so what it shows is true.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]
IdArg = Annotated[str, typer.Argument(help="Sandbox id, unique id prefix, or name.")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")]
PathArg = Annotated[str, typer.Argument(help="Absolute path in the sandbox.")]
_ARGS_AFTER_ID = {"allow_interspersed_args": False, "ignore_unknown_options": True}


def _get(ref: str, project: str | None):  # noqa: ANN202
    from tlimage.runtime import Sandbox

    return Sandbox.get(ref, project=project)


def _ago(ts: float | None) -> str:
    import time

    if ts is None:
        return "-"
    s = max(0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def _info_json(sb) -> dict:  # noqa: ANN001
    return sb.info().to_json()


def register(sbx: typer.Typer) -> None:
    """Adds the sandbox commands to the `sbx` group. Called once, by tlimage/cli/app.py, which
    owns the group: this module never imports app (the import runs one way)."""
    _fs_commands(sbx)

    @sbx.command("new")
    def new(
        name: Annotated[
            str | None,
            typer.Argument(
                help="Name: named sandboxes persist (filesystem kept, can be suspended); "
                "unnamed ones are ephemeral."
            ),
        ] = None,
        image: Annotated[
            str,
            typer.Option(
                "--image",
                help="Registered image NAME[:TAG], a base of `tl sbx image bases` "
                "(default: the default base), or a registry image (pulled).",
            ),
        ] = "",
        cpus: Annotated[float, typer.Option("--cpus", help="CPU cores (fractions allowed).")] = 1.0,
        memory: Annotated[int, typer.Option("--memory", help="Memory in MiB.")] = 512,
        timeout: Annotated[
            float | None,
            typer.Option("--timeout", help="Seconds of running time before it is terminated."),
        ] = None,
        entrypoint: Annotated[
            str | None,
            typer.Option(
                "--entrypoint",
                help="Command to run as the main process (shell words); the "
                "sandbox ends when it exits. Default: idle.",
            ),
        ] = None,
        env: EnvOpt = None,
        workdir: Annotated[
            str | None, typer.Option("--workdir", "-w", help="Default working directory.")
        ] = None,
        user: Annotated[
            str | None, typer.Option("--user", "-u", help="Default user (USER syntax).")
        ] = None,
        isolation: Annotated[
            Isolation,
            typer.Option("--isolation", help="auto: the microVM when KVM works, else namespaces."),
        ] = Isolation.auto,
        backend: Annotated[
            Isolation | None,
            typer.Option("--backend", hidden=True, help="Old name of --isolation."),
        ] = None,
        no_network: Annotated[
            bool, typer.Option("--no-network", help="Only a loopback interface.")
        ] = False,
        network: Annotated[
            str,
            typer.Option(
                "--network",
                help="allow: internet access (default); deny: none but DNS and "
                "--allow entries. Host loopback and private ranges are never "
                "reachable.",
            ),
        ] = "allow",
        block: Annotated[
            list[str] | None,
            typer.Option(
                "--block",
                help="CIDR, address or host name the sandbox may not reach "
                "(repeatable; wins over --allow).",
            ),
        ] = None,
        allow: Annotated[
            list[str] | None,
            typer.Option(
                "--allow",
                help="CIDR, address or host name the sandbox may reach even when "
                "denied or private (repeatable).",
            ),
        ] = None,
        secret: Annotated[
            list[str] | None,
            typer.Option(
                "--secret",
                help="NAME of a stored secret (tl secrets set) to pass as an "
                "environment variable to every exec and spawn (repeatable).",
            ),
        ] = None,
        from_snapshot: Annotated[
            str | None,
            typer.Option(
                "--from-snapshot",
                help="Start from a memory checkpoint (tl sbx snapshot --memory) "
                "instead of an image.",
            ),
        ] = None,
        project: ProjectOpt = None,
        cache_dir: CacheDirOpt = None,
        json_: JsonOpt = False,
        old_image: OldImageOpt = None,
        platform: PlatformOpt = "linux/amd64",
        insecure_registry: InsecureRegistryOpt = None,
        registry_auth: RegistryAuthOpt = None,
    ) -> None:
        """Boot a sandbox from a registered image (default: the default base) and print its id."""
        import json
        import shlex

        image = deprecated_i(image or None, old_image, "tl sbx new", "--image") or ""

        from tlimage.builder.bases import CatalogBases
        from tlimage.runtime import Sandbox

        if from_snapshot is not None:
            sb = Sandbox.from_checkpoint(from_snapshot, name=name, project=project)
            print(json.dumps(_info_json(sb)) if json_ else sb.id)
            return
        if backend is not None and isolation is Isolation.auto:
            isolation = backend
        if image:
            from tlimage._paths import project_name
            from tlimage.builder.images import registered_or_pulled
            from tlimage.cli.options import registry_config

            # Not registered in the project nor a seed base: a registry image, pulled first.
            image = registered_or_pulled(
                project_name(project), image, cache_dir=cache_dir, platform=platform,
                registry_config=registry_config(insecure_registry, registry_auth))  # fmt: skip
        policy = None
        if network != "allow" or block or allow:
            from tlimage.sandbox.network import NetworkPolicy

            policy = NetworkPolicy(network, tuple(block or ()), tuple(allow or ()))
        sb = Sandbox.create(
            image or None, name=name, project=project, backend=isolation.value, cpus=cpus,
            memory=memory,
            timeout=timeout, entrypoint=shlex.split(entrypoint) if entrypoint else None,
            env=env, workdir=workdir, user=user, network=not no_network, cache_dir=cache_dir,
            secret_names=secret or None, network_policy=policy, bases=CatalogBases(),
        )  # fmt: skip
        if json_:
            print(json.dumps(_info_json(sb)))
        else:
            print(sb.id)

    @sbx.command("ls")
    def ls(
        running: Annotated[bool, typer.Option("--running", help="Only running sandboxes.")] = False,
        all_: Annotated[bool, typer.Option("--all", "-a", help="Include terminated ones.")] = False,
        project: ProjectOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """List sandboxes (live ones by default)."""
        from tlimage.runtime import Status, list_sandboxes

        sbs = list_sandboxes(project, include_terminated=all_)
        if running:
            sbs = [s for s in sbs if s.record.status is Status.RUNNING]
        if json_:
            from tlimage.cli.render import emit_json

            for s in sbs:
                emit_json(_info_json(s))
            return
        from tlimage.cli.render import table

        rows = []
        for s in sbs:
            r = s.record
            rows.append([r.id, r.name or "-", str(r.status), r.image_ref, r.backend,
                         f"{r.cpus:g}", f"{r.memory_mb} MiB",
                         "-" if r.timeout is None else f"{r.timeout:g}s",
                         _ago(r.created_at)])  # fmt: skip
        table(
            ["ID", "NAME", "STATUS", "IMAGE", "BACKEND", "CPUS", "MEMORY", "TIMEOUT", "CREATED"],
            rows,
            empty="no sandboxes" + ("" if all_ else " (--all shows ended ones)"),
        )

    @sbx.command("info")
    def info(ref: IdArg, project: ProjectOpt = None, json_: JsonOpt = False) -> None:
        """Show a sandbox: status, image, resources, timeout, entrypoint, times."""
        import json

        d = _info_json(_get(ref, project))
        if json_:
            print(json.dumps(d, indent=2))
            return
        for k, v in d.items():
            if v is None or v == [] or v == "":
                continue
            if isinstance(v, dict):
                v = ", ".join(f"{a}={b}" for a, b in v.items())
            elif isinstance(v, list):
                v = " ".join(str(x) for x in v)
            print(f"{k + ':':<15}{v}")

    @sbx.command("exec", context_settings=_ARGS_AFTER_ID)
    def exec_(
        ref: IdArg,
        cmd: Annotated[list[str], typer.Argument(help="Command and its arguments.")],
        workdir: Annotated[
            str | None, typer.Option("--workdir", "-w", help="Working directory.")
        ] = None,
        env: EnvOpt = None,
        user: Annotated[str | None, typer.Option("--user", "-u", help="USER syntax.")] = None,
        interactive: Annotated[
            bool, typer.Option("--interactive", "-i", help="Pass stdin through.")
        ] = False,
        tty: Annotated[
            bool, typer.Option("--tty", "-t", help="A terminal (with -i: an interactive one).")
        ] = False,
        timeout: Annotated[
            float | None, typer.Option("--timeout", help="Kill it after this many seconds.")
        ] = None,
        project: ProjectOpt = None,
    ) -> int:
        """Run a command in a sandbox; its output streams through and its exit code is ours.
        Options go before the sandbox id: tl sbx exec -w /srv ID ls -la."""
        sb = _get(ref, project)
        sys.stdout.flush()
        if tty:
            return sb.exec_tty(
                *cmd,
                env=env,
                workdir=workdir,
                user=user,
                in_fd=sys.stdin.fileno() if interactive else _devnull(),
            )
        r = sb.exec(
            *cmd,
            env=env,
            workdir=workdir,
            user=user,
            timeout=timeout,
            stdin=sys.stdin.fileno() if interactive else None,
            passthrough=True,
        )
        return r.exit_code

    @sbx.command("shell")
    def shell(
        ref: IdArg,
        user: Annotated[str | None, typer.Option("--user", "-u", help="USER syntax.")] = None,
        workdir: Annotated[
            str | None, typer.Option("--workdir", "-w", help="Working directory.")
        ] = None,
        env: EnvOpt = None,
        project: ProjectOpt = None,
    ) -> int:
        """An interactive shell in a sandbox (bash when it has one, else sh) on a real
        terminal; its exit code is ours."""
        sb = _get(ref, project)
        sys.stdout.flush()
        script = "command -v bash >/dev/null 2>&1 && exec bash || exec sh"
        return sb.exec_tty("/bin/sh", "-c", script, env=env, workdir=workdir, user=user,
                           in_fd=sys.stdin.fileno())  # fmt: skip

    @sbx.command("cp")
    def cp(
        src: Annotated[str, typer.Argument(help="Host path or ID:/path.")],
        dest: Annotated[str, typer.Argument(help="Host path or ID:/path.")],
        project: ProjectOpt = None,
    ) -> None:
        """Copy files between the host and a sandbox (into DEST when it is a folder)."""
        from tlimage.errors import RuntimeError_

        s_ref, s_path = _split(src)
        d_ref, d_path = _split(dest)
        if (s_ref is None) == (d_ref is None):
            raise RuntimeError_("tl sbx cp copies between the host and a sandbox: exactly one "
                                "of SRC and DEST must be ID:/path")  # fmt: skip
        if d_ref is not None:
            import os

            if not os.path.lexists(s_path):
                raise RuntimeError_(f"{s_path}: no such file or folder on the host")
            where = _get(d_ref, project).cp_in(s_path, d_path)
            print(f"{d_ref}:{where}", file=sys.stderr)
        else:
            assert s_ref is not None
            where = _get(s_ref, project).cp_out(s_path, d_path)
            print(str(where), file=sys.stderr)

    @sbx.command("snapshot")
    def snapshot(
        ref: IdArg,
        register: Annotated[
            str | None,
            typer.Option("--register", help="Register as NAME[:TAG] (default: <id>:snap-<n>)."),
        ] = None,
        memory: Annotated[
            bool,
            typer.Option(
                "--memory",
                help="A memory checkpoint (microVM, named sandboxes): restore it with "
                "tl sbx new --from-snapshot NAME.",
            ),
        ] = False,
        with_secrets: Annotated[
            bool,
            typer.Option(
                "--with-secrets",
                help="With --memory, of a sandbox created with --secret: save it anyway (its "
                "memory holds the secrets' values, and so will the checkpoint).",
            ),
        ] = False,
        project: ProjectOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Snapshot a sandbox's filesystem as a registered image (its layers plus one), or
        with --memory its memory, devices and filesystem as a checkpoint."""
        if memory:
            print(_get(ref, project).save_memory(register, with_secrets=with_secrets))
            return
        img = _get(ref, project).snapshot(register)
        if json_:
            import json

            print(
                json.dumps(
                    {
                        "image": img.ref,
                        "image_id": img.image_id,
                        "layers": len(img.manifest.layers),
                        "size": img.size,
                    }
                )
            )
        else:
            print(img.ref)

    @sbx.command("checkpoints")
    def checkpoints(
        rm: Annotated[
            list[str] | None, typer.Option("--rm", help="Delete this checkpoint.")
        ] = None,
        project: ProjectOpt = None,
    ) -> None:
        """List memory checkpoints (tl sbx snapshot --memory), or delete some with --rm."""
        from tlimage.runtime import list_checkpoints, remove_checkpoint

        if rm:
            for n in rm:
                remove_checkpoint(n, project)
                print(n)
            return
        for n in list_checkpoints(project):
            print(n)

    @sbx.command("clone")
    def clone(
        ref: IdArg,
        name: Annotated[str | None, typer.Argument(help="Name of the new sandbox.")] = None,
        register: Annotated[
            str | None, typer.Option("--register", help="Register the snapshot as NAME[:TAG].")
        ] = None,
        memory: Annotated[
            bool,
            typer.Option(
                "--memory", help="Clone memory and device state too (microVM, named sandboxes)."
            ),
        ] = False,
        with_secrets: Annotated[
            bool,
            typer.Option(
                "--with-secrets",
                help="With --memory, of a sandbox created with --secret: clone it anyway (its "
                "memory holds the secrets' values, and so will the clone's).",
            ),
        ] = False,
        project: ProjectOpt = None,
    ) -> None:
        """Start a new sandbox from a snapshot of this one's filesystem (with --memory: from
        its memory and device state too, so its processes continue in both); prints the id."""
        twin = _get(ref, project).clone(name, register=register, memory=memory,
                                        with_secrets=with_secrets)  # fmt: skip
        if not memory:
            print("note: the clone starts from a copy of the filesystem only; running processes "
                  "and memory are not carried over (microVM: --memory)", file=sys.stderr)  # fmt: skip
        print(twin.id)

    @sbx.command("suspend")
    def suspend(ref: IdArg, project: ProjectOpt = None) -> None:
        """Pause a named sandbox (microVM: memory saved to a file, the VM exits)."""
        r = _get(ref, project).suspend()
        print(f"suspended in {r.seconds:.2f} s", file=sys.stderr)
        if r.note:
            print(f"note: {r.note}", file=sys.stderr)

    @sbx.command("resume")
    def resume(ref: IdArg, project: ProjectOpt = None) -> None:
        """Continue a suspended sandbox."""
        s = _get(ref, project).resume()
        print(f"resumed in {s:.2f} s", file=sys.stderr)

    @sbx.command("terminate")
    def terminate(refs: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")],
                  project: ProjectOpt = None) -> None:  # fmt: skip
        """End sandboxes: kill every process and VM, unmount; ephemeral ones lose their files."""
        for ref in refs:
            sb = _get(ref, project)
            sb.terminate()
            print(sb.id)

    @sbx.command("rm")
    def rm(refs: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")],
           force: Annotated[bool, typer.Option("--force", "-f",
                                               help="Terminate live ones first.")] = False,
           project: ProjectOpt = None) -> None:  # fmt: skip
        """Delete ended sandboxes and their files (a named one's kept filesystem too)."""
        from tlimage.errors import RuntimeError_
        from tlimage.runtime import Status

        for ref in refs:
            sb = _get(ref, project)
            if sb.status is not Status.TERMINATED and not force:
                raise RuntimeError_(f"sandbox {sb.id} is {sb.status}",
                                    hint="terminate it first, or use --force")  # fmt: skip
            sb.remove()
            print(sb.id)

    @sbx.command("serve")
    def serve(
        listen: Annotated[
            str,
            typer.Option("--listen", help="unix:PATH or 127.0.0.1:PORT (port 0 picks a free one)."),
        ] = "127.0.0.1:8765",
        backend: Annotated[
            Isolation,
            typer.Option(
                "--isolation", "--backend", help="Isolation of sandboxes created without one."
            ),
        ] = Isolation.auto,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No request log.")] = False,
        project: ProjectOpt = None,
    ) -> None:
        """Serve the sandbox HTTP API (OpenAPI at /openapi.json; bearer token in the
        state folder's api-token file, made on first start)."""
        from tlimage.builder.bases import CatalogBases
        from tlimage.runtime import use_bases
        from tlimage.runtime.http import address_of, make_server

        use_bases(CatalogBases())  # sandboxes the API creates may start from a catalog base
        srv = make_server(listen, project=project, backend=backend.value, quiet=quiet)
        print(f"serving the sandbox API on {address_of(srv)}", flush=True)
        try:
            srv.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            srv.server_close()

    @sbx.command("logs")
    def logs(
        ref: IdArg,
        pid: Annotated[
            str | None,
            typer.Argument(
                help="A spawned process (id or name); without it, the sandbox's console."
            ),
        ] = None,
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="Keep printing until the process ends.")
        ] = False,
        stream: Annotated[
            str | None,
            typer.Option("--stream", help="stdout or stderr (default: both, each to its own)."),
        ] = None,
        project: ProjectOpt = None,
    ) -> None:
        """Print a spawned process's output (kept in a bounded ring per stream), or the
        sandbox's console: the entrypoint's output (or the VM's console)."""
        sb = _get(ref, project)
        if pid is None:
            path = Path(sb.info().dir) / "console.log"
            if path.exists():
                sys.stdout.buffer.write(path.read_bytes())
            return
        proc = sb.process(pid)
        streams = [stream] if stream else ["stdout", "stderr"]
        if not follow:
            for s in streams:
                out = sys.stdout if s == "stdout" else sys.stderr
                out.buffer.write(proc.output(s))
                out.flush()
            return
        import threading

        def pump(s: str) -> None:
            out = sys.stdout if s == "stdout" else sys.stderr
            for chunk in proc.follow(s):
                out.buffer.write(chunk)
                out.flush()

        threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)

    @sbx.command("spawn", context_settings=_ARGS_AFTER_ID)
    def spawn(
        ref: IdArg,
        cmd: Annotated[list[str], typer.Argument(help="Command and its arguments.")],
        name: Annotated[str | None, typer.Option("--name", help="A name for the process.")] = None,
        workdir: Annotated[
            str | None, typer.Option("--workdir", "-w", help="Working directory.")
        ] = None,
        env: EnvOpt = None,
        user: Annotated[str | None, typer.Option("--user", "-u", help="USER syntax.")] = None,
        project: ProjectOpt = None,
    ) -> None:
        """Start a background process in a sandbox and print its process id:
        tl sbx spawn [--name N] ID -- CMD..."""
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        p = _get(ref, project).spawn(*cmd, name=name, env=env, workdir=workdir, user=user)
        print(p.id)

    @sbx.command("ps")
    def ps(ref: IdArg, project: ProjectOpt = None, json_: JsonOpt = False) -> None:
        """List a sandbox's spawned processes (ended ones too)."""
        sts = [p.status() for p in _get(ref, project).processes()]
        if json_:
            from tlimage.cli.render import emit_json

            for st in sts:
                emit_json(st.to_json())
            return
        import shlex

        from tlimage.cli.render import table

        rows = [[str(st.id), st.name or "-", "-" if st.pid is None else str(st.pid), st.state,
                 "-" if st.exit_code is None else str(st.exit_code), _ago(st.started_at),
                 shlex.join(st.cmd)[:60]] for st in sts]  # fmt: skip
        table(["ID", "NAME", "PID", "STATE", "EXIT", "STARTED", "COMMAND"], rows,
              empty="no processes (start one with tl sbx spawn ID -- CMD)")  # fmt: skip

    @sbx.command("kill")
    def kill(
        ref: IdArg,
        pid: Annotated[str, typer.Argument(help="Process id (as spawn and ps show it) or name.")],
        sig: Annotated[str, typer.Option("--signal", "-s", help="Signal name or number.")] = "TERM",
        project: ProjectOpt = None,
    ) -> None:
        """Send a signal to a spawned process (default TERM)."""
        _get(ref, project).process(pid).signal(sig)

    @sbx.command("wait")
    def wait(
        ref: IdArg,
        pid: Annotated[str, typer.Argument(help="Process id or name.")],
        timeout: Annotated[
            float | None, typer.Option("--timeout", help="Give up after seconds.")
        ] = None,
        project: ProjectOpt = None,
    ) -> int:
        """Wait for a spawned process to end; its exit code is ours (1 on a time-out or when
        it could not start)."""
        proc = _get(ref, project).process(pid)
        code = proc.wait(timeout)
        if code is None:
            st = proc.status()
            print(st.error or f"process {proc.id} is still {st.state}", file=sys.stderr)
            return 1
        print(code)
        return code


def _fs_commands(sbx: typer.Typer) -> None:
    """`tl sbx fs ls|cat|write|rm|mkdir|stat ID PATH`."""
    fs = typer.Typer(help="Files inside a running sandbox (paths resolve inside its root).",
                     no_args_is_help=True, rich_markup_mode=None)  # fmt: skip
    sbx.add_typer(fs, name="fs")

    def _row(e) -> list[str]:  # noqa: ANN001 - a FileInfo
        import time

        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        name = e.name + (f" -> {e.link_target}" if e.link_target is not None else "")
        return [e.mode_str, str(e.uid), str(e.gid), str(e.size), when, name]

    @fs.command("ls")
    def fs_ls(ref: IdArg, path: PathArg = "/", project: ProjectOpt = None,
              json_: JsonOpt = False) -> None:  # fmt: skip
        """List a directory with mode, owner, size, mtime and link targets."""
        entries = _get(ref, project).files.list(path)
        if json_:
            from tlimage.cli.render import emit_json

            for e in entries:
                emit_json(e.to_json())
            return
        for e in entries:
            print(" ".join(_row(e)))

    @fs.command("stat")
    def fs_stat(ref: IdArg, path: PathArg, project: ProjectOpt = None,
                json_: JsonOpt = False) -> None:  # fmt: skip
        """Show one path's metadata (a link is described, not followed)."""
        import json

        e = _get(ref, project).files.stat(path)
        if json_:
            print(json.dumps(e.to_json()))
        else:
            print(
                " ".join(_row(e)[:-1] + [e.path])
                + (f" -> {e.link_target}" if e.link_target is not None else "")
            )

    @fs.command("cat")
    def fs_cat(ref: IdArg, path: PathArg, project: ProjectOpt = None) -> None:
        """Print a file's bytes."""
        data = _get(ref, project).files.read(path)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    @fs.command("write")
    def fs_write(
        ref: IdArg,
        path: PathArg,
        source: Annotated[
            Path | None, typer.Option("--from", help="Host file to write (default: stdin).")
        ] = None,
        mode: Annotated[str, typer.Option("--mode", help="Permission bits (octal).")] = "644",
        project: ProjectOpt = None,
    ) -> None:
        """Create or replace a file with stdin (or --from FILE)."""
        from tlimage.errors import RuntimeError_

        try:
            bits = int(mode, 8)
        except ValueError:
            raise RuntimeError_(f"--mode {mode!r}: expected octal permission bits") from None
        if source is not None:
            try:
                data = source.read_bytes()
            except OSError as e:
                raise RuntimeError_(f"{source}: {e.strerror}") from None
        else:
            data = sys.stdin.buffer.read()
        _get(ref, project).files.write(path, data, mode=bits)

    @fs.command("mkdir")
    def fs_mkdir(ref: IdArg, path: PathArg,
                 parents: Annotated[bool, typer.Option("--parents", "-p",
                                                       help="Make parents too.")] = False,
                 project: ProjectOpt = None) -> None:  # fmt: skip
        """Make a directory."""
        _get(ref, project).files.mkdir(path, parents=parents)

    @fs.command("rm")
    def fs_rm(ref: IdArg, path: PathArg,
              recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                                      help="Remove a folder and its content.")
                                   ] = False,
              project: ProjectOpt = None) -> None:  # fmt: skip
        """Remove a file, link or directory."""
        _get(ref, project).files.remove(path, recursive=recursive)


def _devnull() -> int:
    import os

    return os.open(os.devnull, os.O_RDONLY)


def _split(arg: str) -> tuple[str | None, str]:
    """`ID:/path` -> (ID, /path); a host path -> (None, path). Host paths with a colon can be
    written ./a:b."""
    ref, sep, path = arg.partition(":")
    if sep and ref and "/" not in ref and path.startswith("/"):
        return ref, path
    return None, arg
