#!/usr/bin/env bash
# Set everything up (idempotent), then run the main job: DSBO with 4 Ray agents on a ring meta-learns
# few-shot Omniglot on the shipped minimal background split (configs/main.yaml), and the learner is
# tested on 600 5-way and 20-way 1-shot tasks of alphabets no agent saw. Writes runs/main/ (learner.pt,
# metrics.csv / .json, TensorBoard events, curves.png). Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/main
.venv/bin/bilevel-ray run configs/main.yaml --out "$out" "$@"
.venv/bin/bilevel-ray eval "$out/learner.pt" --ways 5 20
