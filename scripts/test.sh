#!/usr/bin/env bash
# The README's test command: bootstraps .venv (idempotent; seconds when already installed) and runs the suite.
# Two pytest workers (GAD_TEST_WORKERS), one test file each at a time (--dist loadfile: a file's module fixtures
# are built once), one intra-op thread each (tests/conftest.py).
#   bash scripts/test.sh            everything (what .ci/run runs)
#   bash scripts/test.sh --fast     no slow / network tests: math, config, data, planner, scripts (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ARGS=()
for a in "$@"; do
  if [ "$a" = --fast ]; then ARGS+=(-m "not slow and not network"); else ARGS+=("$a"); fi
done
exec "$VENV/bin/python" -m pytest -n "${GAD_TEST_WORKERS:-2}" --dist loadfile tests "${ARGS[@]}"
