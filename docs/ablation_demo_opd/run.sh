#!/usr/bin/env bash
# docs/results.md, "White-box OPD and GAD + OPD on the demo task": a white-box teacher (the ablation's student
# trained by SeqKD for 400 steps on every teacher row), then tools/ablate.py's opd, gad+opd, seqkd and gad
# variants from the same warm starts (3 seeds, 120 + 30 steps). Run from the project root; resumable.
set -euo pipefail
OUT=${OUT:-runs/ablation_opd}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
DATA=$($PY -c "from gad_megatron.data import demo; print(demo.ASSET)")
$PY -c "from gad_megatron.data import demo; demo.make_student('$OUT/student', seed=3)"
if [ ! -f $OUT/teacher/summary.json ]; then
  GAD_DEMO_DATA=$DATA $PY -m gad_megatron.trainer.cli --config gad_megatron/assets/demo/demo.yaml \
    model.student=$OUT/student data.train=$DATA train.stage=seqkd train.total_steps=400 train.warmup_steps=0 \
    data.heldout_size=0 eval.at_start=false log.run_dir=$OUT/teacher log.progress=false log.tensorboard=false \
    log.dump_samples_every=0 checkpoint.save_every=400 > $OUT/teacher.log 2>&1
fi
$PY tools/ablate.py local --out $OUT --variants opd gad+opd seqkd gad --opd-teacher $OUT/teacher/hf_student \
  --seeds 1 2 3 --warmup-steps 120 --steps 30
$PY tools/ablate.py report --out $OUT
