"""Run inside a Debian/Ubuntu sandbox: downloads the .deb of every installed package (apt-get
download, the exact installed versions) and compares each path the package declares (dpkg-deb
--fsys-tarfile) with what the sandbox's filesystem has: type, permission bits, owner, group.
Prints one JSON object: the mismatches and counts."""

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import tarfile

EXCLUDED = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/")  # the bases' path-excludes
# apt sets its own download folders to 0700 _apt when it runs (this script runs apt-get).
APT_RUNTIME = ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial")
work = "/var/tmp/debs"
os.makedirs(work, exist_ok=True)
subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
pkgs = subprocess.run(
    ["dpkg-query", "-W", "-f", "${binary:Package}=${Version}\n"],
    check=True,
    capture_output=True,
    text=True,
).stdout.split()
subprocess.run(
    ["apt-get", "download", "-qq", *pkgs], cwd=work, check=True, stdout=subprocess.DEVNULL
)
overrides = set()
if os.path.exists("/var/lib/dpkg/statoverride"):
    overrides = {line.split()[3].lstrip("/") for line in open("/var/lib/dpkg/statoverride")}
diverted = set(
    subprocess.run(["dpkg-divert", "--list"], capture_output=True, text=True).stdout.split()
)
kinds = {
    tarfile.DIRTYPE: stat.S_ISDIR,
    tarfile.REGTYPE: stat.S_ISREG,
    tarfile.SYMTYPE: stat.S_ISLNK,
    tarfile.LNKTYPE: stat.S_ISREG,
}
users = {u.pw_uid: u.pw_name for u in pwd.getpwall()}
groups = {g.gr_gid: g.gr_name for g in grp.getgrall()}
bad, replaced, checked, missing = [], [], 0, 0
for deb in sorted(os.listdir(work)):
    p = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", os.path.join(work, deb)], stdout=subprocess.PIPE
    )
    with tarfile.open(fileobj=p.stdout, mode="r|") as tf:
        for m in tf:
            path = m.name.removeprefix("./").rstrip("/")
            if not path or path in overrides or "/" + path in diverted or path in APT_RUNTIME:
                continue
            if os.path.ismount("/" + path):  # /proc, /sys, /dev: the sandbox's own mounts
                continue
            if (
                path.startswith(EXCLUDED)
                and not path.endswith("/copyright")
                and path not in ("usr/share/doc", "usr/share/man", "usr/share/locale")
            ):
                continue
            try:
                st = os.lstat("/" + path)
            except FileNotFoundError:
                missing += 1
                continue
            checked += 1
            problems = []
            if m.isdir() and stat.S_ISLNK(st.st_mode) and os.path.isdir("/" + path):
                replaced.append(f"/{path} -> {os.readlink('/' + path)}")  # /var/run -> /run
                continue
            if m.type in kinds and not kinds[m.type](st.st_mode):
                problems.append(f"type {m.type!r}")
            if not m.issym() and not m.islnk() and stat.S_IMODE(st.st_mode) != m.mode:
                problems.append(f"mode {stat.S_IMODE(st.st_mode):o} != {m.mode:o}")
            owner, group = users.get(st.st_uid, st.st_uid), groups.get(st.st_gid, st.st_gid)
            if not m.issym() and (owner, group) != (m.uname or m.uid, m.gname or m.gid):
                problems.append(f"owner {owner}:{group} != {m.uname}:{m.gname}")
            if problems:
                bad.append(f"{deb}: /{path}: {', '.join(problems)}")
    p.wait()
json.dump(
    {
        "packages": len(pkgs),
        "checked": checked,
        "missing": missing,
        "bad": bad,
        "replaced_by_links": replaced,
    },
    sys.stdout,
)
