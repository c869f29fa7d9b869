"""Every folder and database tlimage keeps, named once (uv's `CacheBucket`).

Each bucket is a folder or file below one of two roots: the cache (`TLIMAGE_CACHE_DIR`, else
`$XDG_CACHE_HOME/tlimage`, else `~/.cache/tlimage`: everything there can be rebuilt) or the state
folder (`TLIMAGE_STATE_DIR`, else `$XDG_DATA_HOME/tlimage`, else `~/.local/share/tlimage`: the
names of images, sandboxes and secrets). Both roots, and the run root of sandbox sockets, are
made 0700 (`_private.private_dir`): no other host user may list or read the image trees, sandbox
uppers and build scratch below them. A bucket's name carries its format version: a change to
what is stored bumps the version (a new folder) instead of migrating the old one.

    <cache>/
      layers-v1/             the layer store (cache.store): blobs/, index.db, tmp/
        unpacked-v2/         layers unpacked for overlayfs (cache.unpacked)
        mounts/cache/        RUN --mount=type=cache folders (builder.mounts.cachemounts)
        downloads/           ADD <url> bodies, kept by URL for revalidation (builder.fetch)
      filehash-v1/stat.db    stat cache of context file hashes (cache.filehash)
      oci-v1/                remote resolutions and push hints (oci)
      executor-v1/           what build steps run on:
        ext4/                  lower layers as ext4 disk images for the microVM
        bases/                 seed base root filesystems
        guest/                 guest kernel + initramfs kits
        kvm-probe.json         whether KVM works here
    <state>/
      registry-v1.db         registered image names (registry.db)
      runtime-v1.db          sandboxes and their states (runtime)
      sandboxes-v1/          each sandbox's folder (runtime)
      secrets/               project secrets (runtime)

`tl sbx image cache ls --folders` shows the buckets and their sizes; `tl sbx image prune` trims
the `evictable` ones (least recently used entry first) with the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    root: Literal["cache", "state"]
    path: str  # below the root, with `/` separators
    what: str
    evictable: bool = False  # its entries are derived data prune may remove by size and age

    def under(self, root: Path | str) -> Path:
        return Path(root, *self.path.split("/"))


LAYERS = Bucket("layers", "cache", "layers-v1", "the layer store: blobs and their index")
# v2: modes kept exactly (v1 unpacked through tarfile's `tar` filter, which dropped the sticky,
# setuid and group/other write bits: /tmp came out 0755).
UNPACKED = Bucket("unpacked", "cache", "layers-v1/unpacked-v2", "layers unpacked for overlayfs")
CACHE_MOUNTS = Bucket("cache-mounts", "cache", "layers-v1/mounts/cache",
                      "RUN --mount=type=cache folders")  # fmt: skip
DOWNLOADS = Bucket("downloads", "cache", "layers-v1/downloads",
                   "ADD <url> downloads, kept for revalidation", True)  # fmt: skip
FILEHASH = Bucket("filehash", "cache", "filehash-v1", "stat cache of context file hashes")
OCI = Bucket("oci", "cache", "oci-v1", "remote registry resolutions and push hints")
EXECUTOR = Bucket("executor", "cache", "executor-v1", "what build steps run on")
EXT4 = Bucket("ext4", "cache", "executor-v1/ext4", "layers as microVM disk images", True)
BASES = Bucket("bases", "cache", "executor-v1/bases", "seed base root filesystems", True)
GUEST = Bucket("guest", "cache", "executor-v1/guest", "guest kernel and initramfs kits", True)
KVM_PROBE = Bucket("kvm-probe", "cache", "executor-v1/kvm-probe.json", "whether KVM works")
REGISTRY_DB = Bucket("registry", "state", "registry-v1.db", "registered image names")
RUNTIME_DB = Bucket("runtime", "state", "runtime-v1.db", "sandboxes and their states")
SANDBOXES = Bucket("sandboxes", "state", "sandboxes-v1", "each sandbox's folder")
SECRETS = Bucket("secrets", "state", "secrets", "project secrets")

BUCKETS = (LAYERS, UNPACKED, CACHE_MOUNTS, DOWNLOADS, FILEHASH, OCI, EXECUTOR, EXT4, BASES, GUEST,
           KVM_PROBE, REGISTRY_DB, RUNTIME_DB, SANDBOXES, SECRETS)  # fmt: skip
EVICTABLE = tuple(b for b in BUCKETS if b.evictable)
