#!/usr/bin/env bash
# The README's test command: bootstraps .venv (idempotent; seconds when already installed) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$VENV/bin/python" -m pytest tests "$@"
