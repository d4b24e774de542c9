#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two xdist workers (TEST_WORKERS=0: none); each starts its own loopback Ray cluster, once, when a
# test first needs it (tests/conftest.py).
workers=${TEST_WORKERS:-2}
if [ "$workers" -gt 0 ]; then
  exec .venv/bin/python -m pytest -n "$workers" "$@"
fi
exec .venv/bin/python -m pytest "$@"
