#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: unit, golden, property, conformance
# and the VM tests (QEMU microVM under TCG/KVM and the namespace backend).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest tests -q "$@"
