#!/usr/bin/env bash
# SeqKD baseline: Qwen2.5-14B-Instruct on 2 node(s) x 8 H100 80GB. Layout, memory and predicted time: `gad-plan --config examples/configs/seqkd_qwen2.5_14b.yaml --nodes 2`.
#   HF_MODEL=/models/Qwen2.5-14B-Instruct DATA=data/teacher.jsonl sbatch examples/seqkd_14b.sh
#   DRY_RUN=1 bash examples/seqkd_14b.sh        # the resolved layout, memory plan and exact commands; starts nothing
# Requeue: SIGUSR1 before the time limit (lead = the planned checkpoint write + one step) -> checkpoint, clean
# exit, `scontrol requeue`, resume. Pre-flight: gad-doctor on every GPU first (GAD_DOCTOR=0 skips it).
#SBATCH --job-name=seqkd_14b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
CONFIG=${CONFIG:-examples/configs/seqkd_qwen2.5_14b.yaml}
NODES=2 GPUS_PER_NODE=8 TIME_LIMIT=12:00:00   # = the #SBATCH lines (DRY_RUN outside Slurm stands in for this allocation)
HF_MODEL=${HF_MODEL:-/models/Qwen2.5-14B-Instruct}
source "${GAD_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/slurm/gad_job.sh"
