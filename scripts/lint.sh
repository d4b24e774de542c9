#!/usr/bin/env bash
# Static checks (run by .ci/run before the tests): ruff, then import-linter's layer contracts of
# pyproject.toml on the installed package layout. Usage: bash scripts/lint.sh (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check bilevel_ray tasks rl benchmarks tests
# tasks/ and rl/ install as bilevel_ray.tasks and bilevel_ray.rl (package-dir); import-linter reads a
# package from one folder, so check a copy laid out as installed.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cp -r bilevel_ray "$tree/bilevel_ray"
cp -r tasks "$tree/bilevel_ray/tasks"
cp -r rl "$tree/bilevel_ray/rl"
cp pyproject.toml "$tree/"
(cd "$tree" && PYTHONPATH="$tree" "$OLDPWD/.venv/bin/lint-imports" --no-cache)
