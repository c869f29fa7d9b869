#!/usr/bin/env bash
# Sets up a fresh machine, then compiles the example data-tools image and prints its IR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tl sbx image compile examples/data_tools/image.py
