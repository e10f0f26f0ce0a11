#!/usr/bin/env bash
# The README's main-job command: a tiny GAD distillation on CPU (shipped tiny data, model made on the fly).
# Extra arguments are dotted config overrides, e.g. `bash scripts/demo.sh train.total_steps=60`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/gad-train" --demo "$@"
