#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: data hyper-cleaning of scikit-learn's digits
# (50% of the training labels corrupted) with SOBA. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bilevel-ray run configs/hypercleaning_digits.yaml "$@"
