#!/usr/bin/env bash
# GAD: Llama-3.1-8B-Instruct student on 1 node(s) x 8 H100 80GB. Layout, memory and predicted time: `gad-plan --config examples/configs/gad_llama3.1_8b.yaml --nodes 1`.
#   HF_MODEL=/models/Llama-3.1-8B-Instruct DATA=data/teacher.jsonl sbatch examples/gad_8b.sh
#   DRY_RUN=1 bash examples/gad_8b.sh        # the resolved layout, memory plan and exact commands; starts nothing
# Requeue: SIGUSR1 before the time limit (lead = the planned checkpoint write + one step) -> checkpoint, clean
# exit, `scontrol requeue`, resume. Pre-flight: gad-doctor on every GPU first (GAD_DOCTOR=0 skips it).
#SBATCH --job-name=gad_8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
CONFIG=${CONFIG:-examples/configs/gad_llama3.1_8b.yaml}
NODES=1 GPUS_PER_NODE=8 TIME_LIMIT=24:00:00   # = the #SBATCH lines (DRY_RUN outside Slurm stands in for this allocation)
HF_MODEL=${HF_MODEL:-/models/Llama-3.1-8B-Instruct}
source "${GAD_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/slurm/gad_job.sh"
