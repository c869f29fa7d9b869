"""Runs inside a namespace sandbox, started as
`nsenter -t <init> -m -u -i -p [-n] -- python3 -I -S _enter.py fd:N` (the spec on pipe N) (sandbox/namespace.py).

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

import json
import os
import sys
import tarfile


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _init as ns  # noqa: PLC0415 - this file's neighbour, not on sys.path under -I

    # `fd:N`: the spec is JSON on pipe N (never on the command line: it holds the env).
    spec = ns.read_spec(int(sys.argv[1].removeprefix("fd:")))

    ns.STATUS_FD = spec["status_fd"]
    ns.libc()  # ctypes, imported while the host's Python is still reachable
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
    elif mode == "fs":
        fs(spec, ns)
    else:
        ns.fail(f"unknown mode {mode!r}")


def run(spec, ns):
    ns.become({**spec, "pdeathsig": True})


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



def _entry(path, name=None, follow=False):
    import stat as S

    st = os.stat(path) if follow else os.lstat(path)
    kind = ("dir" if S.S_ISDIR(st.st_mode) else "file" if S.S_ISREG(st.st_mode)
            else "symlink" if S.S_ISLNK(st.st_mode) else "fifo" if S.S_ISFIFO(st.st_mode)
            else "socket" if S.S_ISSOCK(st.st_mode) else "char" if S.S_ISCHR(st.st_mode)
            else "block")  # fmt: skip
    return {"name": name if name is not None else (os.path.basename(path) or "/"),
            "path": path, "type": kind, "size": st.st_size, "mode": st.st_mode & 0o7777,
            "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime,
            "link_target": os.readlink(path) if kind == "symlink" else None}  # fmt: skip


def fs(spec, ns):
    """One file operation in the sandbox's root (after the chroot: a link resolves inside
    it, as for cp); the result is JSON on stdout, a failure goes to the status fd."""
    import shutil

    op, path = spec["op"], spec["path"]
    try:
        if op == "stat":
            try:
                out = _entry(path, follow=spec.get("follow", False))
                if spec.get("follow"):
                    out["path"] = os.path.realpath(path)  # inside the root: chroot
            except FileNotFoundError:
                if not spec.get("missing_ok"):
                    raise
                out = None
        elif op == "list":
            if not os.path.isdir(path):
                ns.fail(f"{path}: not a directory")
            out = []
            for name in sorted(os.listdir(path)):
                try:
                    out.append(_entry(os.path.join(path, name), name))
                except FileNotFoundError:
                    continue  # removed while listing
        elif op == "mkdir":
            if spec.get("parents"):
                os.makedirs(path, mode=spec.get("perm", 0o755), exist_ok=True)
            else:
                os.mkdir(path, spec.get("perm", 0o755))
            out = _entry(path)
        elif op == "remove":
            if os.path.isdir(path) and not os.path.islink(path):
                if spec.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
            out = {"path": path}
        else:
            ns.fail(f"unknown file operation {op!r}")
    except OSError as e:
        ns.fail(f"{path}: {e.strerror}")
    os.close(ns.STATUS_FD)
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
