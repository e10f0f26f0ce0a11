#!/bin/bash
# Pre-registered (2026-12-06, before any result): GAD as the paper with G's GAD-stage lr at the paper's 1e-6
# (the recipe's is 1e-5), seed 2, 16 steps from the seed-2 warm start of docs/results.md's SmolLM2 table
# (runs/ablation_smollm2_glr/warm_seed2 was a link to runs/ablation_smollm2/warm_seed2).
cd "$(dirname "$0")/../.."  # the repository root
export GAD_SMOLLM2=$(.venv/bin/gad-convert smollm2)
echo "student $GAD_SMOLLM2"
exec .venv/bin/python tools/ablate.py local --config examples/smollm2/gad.yaml --out runs/ablation_smollm2_glr --seeds 2 --timeout 7200 \
  --variants gad --warmup-steps 60 --steps 16 train.d_warmup_last=12 log.progress=false log.tensorboard=false \
  checkpoint.export_hf_at_end=false gad_stage.g_lr=1e-6
