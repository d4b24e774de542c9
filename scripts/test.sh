#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two xdist workers (TEST_WORKERS=0: none): the tests on the session's Ray cluster are one group, so one
# worker holds the cluster and runs them while the other runs the rest (the Ray tests' actors are
# CPU-bound too, so two workers save about 13% on two cores, not half).
workers=${TEST_WORKERS:-2}
if [ "$workers" -gt 0 ]; then
  exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup "$@"
fi
exec .venv/bin/python -m pytest "$@"
