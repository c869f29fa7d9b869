"""The bundled runtime: sandboxes booted from registered images, with their whole lifecycle.

    from tlimage.runtime import Sandbox, list_sandboxes

    sb = Sandbox.create("hello:latest", name="dev", cpus=1, memory=512, timeout=600)
    r = sb.exec("sh", "-c", "echo $APP_ENV", env={"X": "1"}, workdir="/srv", user="app")
    sb.cp_in("local.txt", "/tmp/"); sb.cp_out("/etc/os-release", "out/")
    img = sb.snapshot(register="dev-snap:v1")     # a registered image: image layers + changes
    sb.suspend(); sb.resume()                     # named sandboxes only
    twin = sb.clone()                             # a new sandbox from a snapshot
    p = sb.spawn("python3", "-m", "http.server")  # background; p.status(), p.signal(), p.wait()
    set_secret("API_KEY", "…")                    # per project, 0600 in the state folder
    Sandbox.create("hello", secret_names=["API_KEY"])  # $API_KEY in every exec and spawn
    sb.terminate()

Backends: `microvm` (QEMU -M microvm with the guest agent; memory snapshots on suspend) and
`namespace` (PID/mount/UTS/IPC namespaces on overlayfs; suspend freezes in RAM). `auto` takes
the microVM when KVM boots and the namespace backend otherwise, as builds do.

Daemonless: every sandbox has one supervising process of its own (PID 1 of the namespace
sandbox, or the VM's shim) and state lives in SQLite (`<state dir>/runtime-v1.db`); any `tl`
command reconciles that state with the host first, so nothing is left behind by a crashed CLI
or a reboot.
"""

from tlimage.runtime._api import (
    BACKENDS,
    ExecResult,
    Sandbox,
    SandboxInfo,
    SuspendResult,
    end_stray_sandboxes,
    list_checkpoints,
    list_sandboxes,
    live_cache_paths,
    live_layer_digests,
    reconcile,
    remove_checkpoint,
    stray_sandboxes,
)
from tlimage.runtime._bases import BaseImages, use_bases
from tlimage.runtime._errors import ExecStartError, ExecTimeout, SandboxNotFound
from tlimage.runtime._files import FileInfo
from tlimage.runtime._procs import Process, ProcessStatus
from tlimage.runtime._secrets import list_secrets, remove_secret, set_secret
from tlimage.runtime._state import Status

__all__ = [
    "BACKENDS",
    "BaseImages",
    "ExecResult",
    "ExecStartError",
    "ExecTimeout",
    "FileInfo",
    "Process",
    "ProcessStatus",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotFound",
    "Status",
    "SuspendResult",
    "end_stray_sandboxes",
    "list_checkpoints",
    "list_sandboxes",
    "list_secrets",
    "live_cache_paths",
    "live_layer_digests",
    "reconcile",
    "remove_checkpoint",
    "remove_secret",
    "set_secret",
    "stray_sandboxes",
    "use_bases",
]
