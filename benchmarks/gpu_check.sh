#!/usr/bin/env bash
# One short GPU check for a lent H100/H200 (see the device tool's README). Prepare once on the CPU machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl megatron-core==0.16.1
# then run it there with carry [".whl"]:  bash benchmarks/gpu_check.sh
# It prints two tables and leaves gpu_check.log / gpu_check.json / gpu_check_trainer.json under $OUT. Record the numbers in
# docs/performance.md (card, date).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_check.log"
# First the pre-flight table (gad-doctor on the demo config, one rank): GPU, driver, FP8, versions, all-reduce,
# disk. A FAIL is reported, not fatal here (the image lacks TE / vLLM on purpose: the checks below still run).
timeout 120 python3 -m gad_megatron.doctor.cli --demo log.run_dir="$OUT/doctor" 2>&1 | tee -a "$OUT/gpu_check.log"
rc0=${PIPESTATUS[0]}
cp "$OUT/doctor/doctor.json" "$OUT/gpu_check_doctor.json" 2>/dev/null
echo "gad-doctor exit code $rc0" | tee -a "$OUT/gpu_check.log"
timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node=1 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
rc1=${PIPESTATUS[0]}
# The trainer on GPU: a GAD step in bf16 (TE spec) and FP8 when TE is there, the CUDA IPC sync into vLLM when
# vLLM is there, G's update MFU next to megatron's bare forward_backward.
TRAINER_ARGS=()  # the CPU dry run (--device cpu) runs the trainer's check small, on CPU too
if [[ " $* " == *" --device cpu "* ]]; then TRAINER_ARGS=(--device cpu --small); fi
timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node=1 benchmarks/gpu_check_trainer.py --out "$OUT" "${TRAINER_ARGS[@]}" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
rc2=${PIPESTATUS[0]}
# gad-train itself on the device: the demo with megatron-engine (KV-cached) rollouts, checkpoints, a resume.
RUN_DEVICE=cuda
if [[ " $* " == *" --device cpu "* ]]; then RUN_DEVICE=cpu; fi
timeout 420 python3 benchmarks/gpu_check_run.py --out "$OUT" --device "$RUN_DEVICE" 2>&1 | tee -a "$OUT/gpu_check.log"
rc3=${PIPESTATUS[0]}
exit $(( rc1 != 0 ? rc1 : (rc2 != 0 ? rc2 : rc3) ))
