#!/bin/bash
# The pre-registered comparison of PLAN.md (#33 item 4). Resumable: re-run the same command; finished runs are
# skipped and a killed variant continues from its last checkpoint (every 8 steps).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT=runs/gad_vs_seqkd_smollm2
mkdir -p "$OUT"
.venv/bin/gad-convert smollm2 >/dev/null  # the recipe's student, converted once (the YAML finds it)
WARM=runs/oracle_search_smollm2/setting1/warm_seed1  # seed 1's warm start: the oracle search's, the same command
[ -e "$OUT/warm_seed1" ] || { [ -d "$WARM" ] && ln -sfn "$(cd "$WARM" && pwd)" "$OUT/warm_seed1"; }
.venv/bin/python tools/ablate.py local --variants seqkd gad gad+fixes oracle --seeds 1 2 \
  --config examples/smollm2/gad.yaml --timeout 36000 --warmup-steps 60 --steps 32 --save-every 8 --out "$OUT" \
  train.d_warmup_last=12 log.progress=false log.tensorboard=false checkpoint.export_hf_at_end=false \
  eval.samples=4 gad_stage.g_schedule=constant gad_stage.g_lr=3e-6 gad_stage.batch_prompts=4 rollout.n=4
.venv/bin/python tools/ablate.py report --out "$OUT"
