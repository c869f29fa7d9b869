#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: unit, golden, property, conformance
# and the VM tests (QEMU microVM under TCG/KVM and the namespace backend).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first: a mistake here costs seconds, not the suite's run. `ruff format --check` covers
# the files already in the formatter's style; the rest of the tree joins it in one reformat.
python3 -m ruff check tlimage tests bench
python3 -m ruff format --check tlimage/_layout.py tlimage/ir tlimage/frontends/mounts.py \
    tlimage/frontends/problem.py tests/style tests/unit/test_layout.py \
    tests/property/test_dockerfile_oracle.py
python3 -m pytest tests -q "$@"
