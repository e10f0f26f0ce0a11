#!/usr/bin/env bash
# The README's test command: bootstraps .venv (idempotent; seconds when already installed) and runs the suite.
# Two pytest workers (GAD_TEST_WORKERS), one test file each at a time (--dist loadfile: a file's module fixtures
# are built once): most tests wait on subprocesses or use one core, so two files at a time fill the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$VENV/bin/python" -m pytest -n "${GAD_TEST_WORKERS:-2}" --dist loadfile tests "$@"
