#!/bin/bash
# The pre-registered oracle search of PLAN.md (#33 item 3). Resumable: re-run the same command; a setting with a
# verdict line is skipped, a run killed part-way continues from its last checkpoint. Stops at the first setting
# that learns (paired held-out change > 2 standard errors) or once the settings have taken 6 CPU hours.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT=runs/oracle_search_smollm2
VERDICTS=docs/oracle_search_smollm2/verdicts.txt
mkdir -p "$OUT"
touch "$VERDICTS"
.venv/bin/gad-convert smollm2 >/dev/null  # the recipe's student, converted once (the YAML finds it)
# --save-every 8 (added 2026-12-08, before setting 1's oracle run finished: sessions end hard, and a variant killed
# without a checkpoint started over; a resumed run's numbers are the uninterrupted run's, tested)
common=(--config examples/smollm2/gad.yaml --seeds 1 --timeout 36000 --warmup-steps 60 --steps 32 --save-every 8)
over=(train.d_warmup_last=12 log.progress=false log.tensorboard=false checkpoint.export_hf_at_end=false
      eval.samples=4 gad_stage.g_schedule=constant)
WARM="$OUT/setting1/warm_seed1"  # setting 1's run makes the warm start; the others link to it
for setting in "1 3e-6 4 4" "2 1e-6 4 4" "3 3e-6 4 8" "4 1e-6 4 8" "5 3e-6 16 4" "6 1e-6 16 4" "7 3e-6 16 8" "8 1e-6 16 8"; do
  read -r k lr prompts n <<< "$setting"
  if grep -q "^setting $k " "$VERDICTS"; then
    grep "^setting $k " "$VERDICTS"
    if grep -q "^setting $k .*: learns$" "$VERDICTS"; then exit 0; fi
    continue
  fi
  spent=$( (grep -o "([0-9]* min)" "$VERDICTS" || true) | tr -dc '0-9\n' | awk '{s += $1} END {print s + 0}')
  if [ "$spent" -ge 360 ]; then echo "6 CPU hours spent ($spent min): the search stops before setting $k (PLAN.md)"; exit 0; fi
  dir="$OUT/setting$k"
  mkdir -p "$dir"
  [ "$k" = 1 ] || ln -sfn "$(cd "$WARM" && pwd)" "$dir/warm_seed1"
  t0=$(date +%s)
  .venv/bin/python tools/ablate.py local --variants oracle "${common[@]}" --out "$dir" "${over[@]}" \
    gad_stage.g_lr="$lr" gad_stage.batch_prompts="$prompts" rollout.n="$n"
  verdict=$(.venv/bin/python -m gad_megatron.eval.paired "$WARM" after "$dir/oracle/seed1" after)
  echo "setting $k lr $lr prompts $prompts n $n ($(( ($(date +%s) - t0) / 60 )) min): $verdict" | tee -a "$VERDICTS"
  case "$verdict" in *": learns") exit 0;; esac
done
