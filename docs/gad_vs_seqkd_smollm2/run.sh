#!/bin/bash
# The pre-registered comparison of PLAN.md (#33 item 4). Resumable: re-run the same command; finished runs are
# skipped and a killed variant continues from its last checkpoint (every 8 steps).
#   bash docs/gad_vs_seqkd_smollm2/run.sh         run (or go on)
#   bash docs/gad_vs_seqkd_smollm2/run.sh keep    copy each finished run's small files (summary, metrics, per-prompt
#                                                 held-out scores, config) into docs/gad_vs_seqkd_smollm2/runs/ to
#                                                 commit: a later session on a fresh machine restores them (below)
#                                                 and runs only what is left. Checkpoints (GBs) are not kept: a
#                                                 seed whose warm start is gone makes it again, the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT=runs/gad_vs_seqkd_smollm2
KEPT=docs/gad_vs_seqkd_smollm2/runs
mkdir -p "$OUT"
if [ "${1:-}" = keep ]; then
  for s in "$OUT"/*/seed*/summary.json "$OUT"/warm_seed*/summary.json; do
    [ -f "$s" ] || continue
    run=$(dirname "$s"); name="$(basename "$(dirname "$run")")_$(basename "$run")"
    case "$(basename "$run")" in warm_seed*) name=$(basename "$run");; esac
    mkdir -p "$KEPT/$name"
    cp -r "$run/config.yaml" "$run/heldout" "$run/metrics.jsonl" "$run/summary.json" "$KEPT/$name/"
    echo "kept $name"
  done
  exit 0
fi
for k in "$KEPT"/*_seed*; do  # restore what an earlier session finished: ablate skips a run with its summary.json
  [ -d "$k" ] || continue
  name=$(basename "$k"); run="$OUT/${name%_seed*}/seed${name##*_seed}"
  case "$name" in warm_seed*) run="$OUT/$name";; esac  # (its checkpoint is not kept: ablate makes it again)
  [ -f "$run/summary.json" ] || { mkdir -p "$run"; cp -r "$k"/. "$run/"; echo "restored $name"; }
done
.venv/bin/gad-convert smollm2 >/dev/null  # the recipe's student, converted once (the YAML finds it)
WARM=runs/oracle_search_smollm2/setting1/warm_seed1  # seed 1's warm start: the oracle search's, the same command
[ -e "$OUT/warm_seed1" ] || { [ -d "$WARM" ] && ln -sfn "$(cd "$WARM" && pwd)" "$OUT/warm_seed1"; }
.venv/bin/python tools/ablate.py local --variants seqkd gad gad+fixes oracle --seeds 1 2 \
  --config examples/smollm2/gad.yaml --timeout 36000 --warmup-steps 60 --steps 32 --save-every 8 --out "$OUT" \
  train.d_warmup_last=12 log.progress=false log.tensorboard=false checkpoint.export_hf_at_end=false \
  eval.samples=4 gad_stage.g_schedule=constant gad_stage.g_lr=3e-6 gad_stage.batch_prompts=4 rollout.n=4
.venv/bin/python tools/ablate.py report --out "$OUT"
