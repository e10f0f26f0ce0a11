#!/bin/bash
# Pre-registered (2026-12-06, before any seed-3 result): a third seed of the lr-1e-6 comparison, same settings as
# seeds 1-2: a new seed-3 warm start, gad with G lr 1e-6, and seqkd from that warm start. Reported as it comes.
cd "$(dirname "$0")/../.."  # the repository root
export GAD_SMOLLM2=$(.venv/bin/gad-convert smollm2)
common="--config examples/smollm2/gad.yaml --out runs/ablation_smollm2_glr --seeds 3 --timeout 7200 --warmup-steps 60 --steps 16"
over="train.d_warmup_last=12 log.progress=false log.tensorboard=false checkpoint.export_hf_at_end=false"
.venv/bin/python tools/ablate.py local --variants gad $common $over gad_stage.g_lr=1e-6 || exit 1
exec .venv/bin/python tools/ablate.py local --variants seqkd $common $over
