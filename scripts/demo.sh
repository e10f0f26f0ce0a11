#!/usr/bin/env bash
# The README's main-job command: a tiny GAD distillation on CPU (shipped tiny data, model made on the fly).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$VENV/bin/gad-train" "$@"
