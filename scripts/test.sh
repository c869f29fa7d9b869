#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: unit, golden, property, conformance
# and the VM tests (QEMU microVM under TCG/KVM and the namespace backend).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first: a mistake here costs seconds, not the suite's run.
python3 -m ruff check tlimage tests bench
python3 -m ruff format --check tlimage tests bench
python3 -m pytest tests -q --durations=20 "$@"
