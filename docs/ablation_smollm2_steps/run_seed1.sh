#!/bin/bash
# Pre-registered (2026-12-06, before any result; exploratory, 1 seed): twice the steps from the seed-1 warm start
# of docs/ablation_smollm2_glr (runs/ablation_smollm2_steps/warm_seed1 is a link to it). `gad` at G lr 1e-6 and
# `seqkd` each get 32 steps of 4 prompts (128 teacher answers each, vs 64 in the 16-step rows). Question: does
# GAD's greedy gap to SeqKD (-0.018 at 16 steps in seed 1) close with more steps? Reported as it comes.
cd "$(dirname "$0")/../.."  # the repository root
export GAD_SMOLLM2=$(.venv/bin/gad-convert smollm2)
out=runs/ablation_smollm2_steps
mkdir -p $out && ln -sfn "$(pwd)/runs/ablation_smollm2_glr/warm_seed1" $out/warm_seed1
common="--config examples/smollm2/gad.yaml --out $out --seeds 1 --timeout 7200 --warmup-steps 60 --steps 32"
over="train.d_warmup_last=12 log.progress=false log.tensorboard=false checkpoint.export_hf_at_end=false"
.venv/bin/python tools/ablate.py local --variants seqkd $common $over || exit 1
exec .venv/bin/python tools/ablate.py local --variants gad $common $over gad_stage.g_lr=1e-6
