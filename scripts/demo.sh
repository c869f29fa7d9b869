#!/usr/bin/env bash
# Sets up a fresh machine, builds the example data-tools image (pandas, pyarrow, Jupyter on
# debian-minimal), registers it, then launches a sandbox from it and runs a command inside.
# Build steps and sandboxes run in a QEMU microVM when KVM works, otherwise in a namespace
# sandbox (tl says which). A second run is served from the layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tl sbx image create examples/data_tools/image.py
tl sbx image ls
id=$(tl sbx new --image data-tools)
trap 'tl sbx terminate "$id" >/dev/null' EXIT
tl sbx exec "$id" python3 -c \
  'import os, pandas, pyarrow; print("pandas", pandas.__version__, "pyarrow", pyarrow.__version__, "APP_ENV", os.environ["APP_ENV"])'
tl sbx exec "$id" ls -ld /workspace/cache
