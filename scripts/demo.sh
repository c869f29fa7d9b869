#!/usr/bin/env bash
# Sets up a fresh machine, then builds the example data-tools image (pandas, pyarrow, Jupyter on
# debian-minimal) and registers it. Build steps run in a QEMU microVM when KVM works, otherwise
# in a namespace sandbox (the build says which). A second run is served from the layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tl sbx image create examples/data_tools/image.py
tl sbx image ls
