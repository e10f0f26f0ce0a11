#!/usr/bin/env bash
# Convert a local Qwen2.5-14B-Instruct (safetensors) into a TP4 PP2 megatron checkpoint for the student and
# the discriminator (D starts from the student's weights with a fresh scalar head), then check parity.
#   bash examples/convert_qwen2.5_14b.sh /models/Qwen2.5-14B-Instruct /ckpt
set -euo pipefail
HF=${1:?HF model dir}; OUT=${2:?output dir}
gad-convert hf-to-mcore --hf "$HF" --out "$OUT/student" --tp 4 --pp 2
gad-convert hf-to-mcore --hf "$HF" --out "$OUT/discriminator" --tp 4 --pp 2 --role discriminator
gad-convert verify --hf "$HF" --ckpt "$OUT/student" --tp 4 --pp 2 --tol 1e-2
