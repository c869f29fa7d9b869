#!/usr/bin/env bash
# Installs everything tlimage needs on a fresh Debian 12 machine (as root): the host tools the
# executor and runtime start (QEMU, mmdebstrap, busybox, e2fsprogs, ...) and the Python package.
# Idempotent: packages already present are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils mmdebstrap busybox-static e2fsprogs cpio zstd
  bubblewrap dpkg-dev gcc libc6-dev uidmap iproute2
  # OCI interop tests: a real registry (CNCF distribution), htpasswd, and peer tools.
  docker-registry apache2-utils openssl skopeo umoci podman buildah golang-github-containers-common
  # a sandbox's private network: the user-mode stack and the rules written into its namespace
  slirp4netns nftables
  # the HTTP API's tests reach a unix socket with curl
  curl
  # the security suite's reference: its probes also run under `buildah run` (runc)
  runc
  # Namespace sandboxes: the default seccomp profile (containers-common) and libseccomp.
  golang-github-containers-common libseccomp2
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js may come from elsewhere than Debian (with its own npm): only the commands matter.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# The executor fetches the guest kernel with `apt-get download`: the package lists must know it.
if ((${#missing[@]})) || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
fi
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# debian-minimal is Debian 13 (trixie): mmdebstrap verifies it with the trixie archive keys, which
# bookworm's debian-archive-keyring carries from 2023.3+deb12u2 on.
if [ ! -f /usr/share/keyrings/debian-archive-trixie-automatic.gpg ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq debian-archive-keyring >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

# The TypeScript SDK's own dependencies (only `typescript`, for .ts image files).
(cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error)
