"""Runs inside a namespace sandbox, started as
`nsenter -t <init> -m -u -i -p [-n] -- python3 -I -S _nsexec.py SPEC_JSON`.

Modes:
    exec  chroot into the sandbox root, become the user, cd, exec argv with exactly `env`
    put   read a tar on stdin whose single top-level entry is `_`, and write it as `dest`
          (or `dest/<name>` when `dest` is a directory), owners as in the tar
    get   write `src` as a tar with the single top-level entry `_` on stdout (a symlink is
          copied as the link, as `docker cp` does)

Everything that can fail before the program runs is written to `status_fd` (closed on exec)
and ends with exit 127, so the host tells "could not start" from an exit code. Modules are
imported before the chroot: the sandbox need not have a Python.
"""

import ctypes
import json
import os
import signal
import sys
import tarfile

PR_SET_PDEATHSIG = 1


def main():
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["nsinit_dir"])
    import _nsinit as ns  # noqa: PLC0415 - found through the spec, not sys.path

    ns.STATUS_FD = spec["status_fd"]
    os.set_inheritable(ns.STATUS_FD, False)
    for procs in spec["cgroup_procs"]:
        try:
            with open(procs, "w") as f:
                f.write("0")
        except OSError:
            pass  # the sandbox is ending; the chroot below fails if it is gone
    try:
        os.chroot(spec["merged"])
        os.chdir("/")
    except OSError as e:
        ns.fail(f"cannot enter the sandbox root: {e.strerror}")
    mode = spec["mode"]
    if mode == "exec":
        run(spec, ns)
    elif mode == "put":
        put(spec, ns)
    elif mode == "get":
        get(spec, ns)
    else:
        ns.fail(f"unknown mode {mode!r}")


def run(spec, ns):
    uid, gid, groups, home = ns.resolve_user(spec["user"])
    try:
        os.chdir(spec["workdir"] or "/")
    except OSError as e:
        ns.fail(f"workdir {spec['workdir']}: {e.strerror}")
    env = dict(e.split("=", 1) for e in spec["env"])
    argv = spec["argv"]
    exe = ns.find_exec(argv[0], env.get("PATH", "/usr/bin:/bin"))
    if exe is None:
        ns.fail(f'exec: "{argv[0]}": executable file not found in $PATH')
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        ns.fail(f"set user {spec['user']}: {e.strerror}")
    env.setdefault("HOME", home)
    for s in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(s, signal.SIG_DFL)
    # After setuid (which clears it): the program dies with nsenter, which the host kills on
    # timeout or interrupt. Programs it starts are not affected.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.execve(exe, argv, env)
    except OSError as e:
        ns.fail(f"exec {argv[0]}: {e.strerror}")


def _target(ns, dest, name):
    if os.path.isdir(dest):
        return os.path.join(dest, name)
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        ns.fail(f"{parent}: no such directory in the sandbox")
    if dest.endswith("/"):
        ns.fail(f"{dest}: no such directory in the sandbox")
    return dest.rstrip("/")


def put(spec, ns):
    target = _target(ns, spec["dest"], spec["name"])
    base = os.path.basename(target) or "."
    os.chdir(os.path.dirname(target) or "/")
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
        for m in tf:
            if m.name != "_" and not m.name.startswith("_/"):
                ns.fail(f"unexpected entry {m.name!r} in the copied archive")
            m.name = base + m.name[1:]
            if m.islnk():
                m.linkname = base + m.linkname[1:]
            if m.isdir() and os.path.isdir(m.name):
                os.chmod(m.name, m.mode & 0o7777)
                continue
            tf.extract(m, ".", numeric_owner=True, filter="fully_trusted")
    sys.stdout.write(json.dumps({"path": target}))
    sys.stdout.flush()
    os.close(ns.STATUS_FD)


def get(spec, ns):
    src = spec["src"]
    try:
        os.lstat(src)
    except OSError as e:
        ns.fail(f"{src}: {e.strerror}")
    os.close(ns.STATUS_FD)
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname="_", recursive=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
