# The body of the sbatch scripts (examples/gad_*.sh, examples/seqkd_*.sh): sourced by them, never run alone.
# The calling script sets CONFIG, NODES, GPUS_PER_NODE (equal to its #SBATCH lines) and HF_MODEL.
#
# Environment (all optional):
#   HF_MODEL         HF directory of the student, converted once to $RUN_DIR/init/student (the first step)
#   DATA             teacher rows (gad-collect output); default: the config's data.train
#   RUN_NAME/RUN_DIR one directory for everything: logs/, TensorBoard, metrics, checkpoints/, init/
#   OVERRIDES        extra dotted config overrides ("rollout.n=4 train.total_steps=100")
#   CONTAINER_IMAGE  pyxis/enroot image (docker://... or .sqsh): srun --container-image; CONTAINER_MOUNTS
#   VENV             else: a virtualenv to activate
#   GPU_TYPE         for the memory plan (h100-80gb, h200, a100-80gb)
#   DRY_RUN=1        print the resolved layout, the memory plan and the exact commands; start nothing
set -euo pipefail
: "${CONFIG:?the sbatch script sets CONFIG}" "${NODES:?}" "${GPUS_PER_NODE:?}"
GAD_ROOT=${GAD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$GAD_ROOT"
GPU_TYPE=${GPU_TYPE:-h100-80gb}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .yaml)}
RUN_DIR=${RUN_DIR:-$GAD_ROOT/runs/$RUN_NAME}
INIT_CKPT=${INIT_CKPT:-$RUN_DIR/init/student}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if [ -n "${CONTAINER_IMAGE:-}" ]; then
  SRUN_ENV=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$GAD_ROOT:$GAD_ROOT}"
            --container-workdir="$GAD_ROOT")
else
  SRUN_ENV=()
  if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; fi
fi

# Outside an allocation (DRY_RUN on a login node): stand in for the allocation the #SBATCH lines ask for.
if [ -z "${SLURM_JOB_ID:-}" ]; then
  if [ "$DRY_RUN" != 1 ]; then echo "not inside a Slurm job: submit with sbatch, or DRY_RUN=1" >&2; exit 2; fi
  export SLURM_JOB_ID=0 SLURM_NNODES=$NODES SLURM_JOB_NODELIST="node[1-$NODES]" SLURM_GPUS_ON_NODE=$GPUS_PER_NODE
fi
# MASTER_ADDR (first node), MASTER_PORT (from the job id: a requeued job keeps it), GAD_WORLD_SIZE, ...
# Captured first: inside eval "$(...)" the helper's exit code is lost and set -u fails later on a variable
# it never set ("unbound variable") instead of on its own clear error.
SLURM_LINES=$("$PYTHON" -m gad_megatron.runtime.slurm env) || { echo "gad_job.sh: not inside a Slurm allocation (see the error above)" >&2; exit 1; }
eval "$SLURM_LINES"

# The trainer's arguments: one run directory, the converted student, resume from the run's own checkpoints.
TRAIN_ARGS=(--config "$CONFIG" "log.run_dir=$RUN_DIR" "model.student=$INIT_CKPT" "checkpoint.resume=auto"
            "parallel.nproc=$GAD_WORLD_SIZE")
if [ -n "${DATA:-}" ]; then TRAIN_ARGS+=("data.train=$DATA"); fi
read -r -a EXTRA <<< "${OVERRIDES:-}"
TRAIN_ARGS+=("${EXTRA[@]}")

# The layout and its memory plan, from the config and this allocation; a layout that does not fit stops here.
PLAN_MODEL=()
if [ -f "${HF_MODEL:-/nonexistent}/config.json" ]; then PLAN_MODEL=(--model "$HF_MODEL"); fi
set +e
PLAN=$("$PYTHON" -m gad_megatron.plan --config "$CONFIG" "${PLAN_MODEL[@]}" --gpu "$GPU_TYPE" \
       --nodes "$GAD_NUM_NODES" --gpus-per-node "$GAD_GPUS_PER_NODE" --shell "${EXTRA[@]}" ${DATA:+"data.train=$DATA"})
PLAN_RC=$?
set -e
eval "$PLAN"  # TP PP DP ROLLOUT_TP WORLD FITS PEAK_GIB LAYOUT RUN_HOURS
echo "job $SLURM_JOB_ID: $GAD_NUM_NODES node(s) x $GAD_GPUS_PER_NODE GPU(s) = world $GAD_WORLD_SIZE; rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "layout: $LAYOUT (TP=$TP PP=$PP DP=$DP rollout TP=$ROLLOUT_TP); memory peak $PEAK_GIB GiB per GPU on $GPU_TYPE; predicted run $RUN_HOURS h"
echo "run directory: $RUN_DIR (logs/, tensorboard/, metrics.jsonl, checkpoints/, init/)"
if [ "$PLAN_RC" -ne 0 ] || [ "$FITS" != 1 ]; then
  echo "error: this layout does not fit $GAD_NUM_NODES x $GAD_GPUS_PER_NODE $GPU_TYPE (gad-plan --config $CONFIG --nodes $GAD_NUM_NODES --search lists those that do)" >&2
  exit 1
fi

# Step 1 (once): HF -> megatron at the training layout, TP*PP ranks on as few nodes as hold them.
CONV_TASKS=$((TP * PP))
CONV_NODES=$(( (CONV_TASKS + GAD_GPUS_PER_NODE - 1) / GAD_GPUS_PER_NODE ))
CONVERT_CMD=(srun --nodes="$CONV_NODES" --ntasks="$CONV_TASKS" --ntasks-per-node=$(( CONV_TASKS < GAD_GPUS_PER_NODE ? CONV_TASKS : GAD_GPUS_PER_NODE ))
             "${SRUN_ENV[@]}" gad-convert hf-to-mcore --hf "${HF_MODEL:-HF_MODEL_NOT_SET}" --out "$INIT_CKPT" --tp "$TP" --pp "$PP"
             --device cuda)
# Step 2: every GPU one rank (srun-native: RANK/LOCAL_RANK from SLURM_PROCID/SLURM_LOCALID). SIGUSR1 arrives
# 120 s before the time limit (--signal=USR1@120): each rank finishes its step, the checkpoint is written,
# the trainer exits 0 leaving $RUN_DIR/stopped.json, and this script requeues the job, which resumes.
TRAIN_CMD=(srun --nodes="$GAD_NUM_NODES" --ntasks-per-node="$GAD_GPUS_PER_NODE" --kill-on-bad-exit=1
           "${SRUN_ENV[@]}" gad-train "${TRAIN_ARGS[@]}")
NEED_CONVERT=1
if [ -f "$INIT_CKPT/latest_checkpointed_iteration.txt" ]; then NEED_CONVERT=0; fi

if [ "$DRY_RUN" = 1 ]; then
  if [ "$NEED_CONVERT" = 1 ]; then echo "command: $(printf '%q ' "${CONVERT_CMD[@]}")"; fi
  echo "command: $(printf '%q ' "${TRAIN_CMD[@]}")"
  exit 0
fi

mkdir -p "$RUN_DIR/logs"
if [ "$NEED_CONVERT" = 1 ]; then
  : "${HF_MODEL:?set HF_MODEL to the student HF directory (the first run converts it)}"
  "${CONVERT_CMD[@]}" 2>&1 | tee -a "$RUN_DIR/logs/convert-$SLURM_JOB_ID.log"
fi
set +e
"${TRAIN_CMD[@]}" 2>&1 | tee -a "$RUN_DIR/logs/train-$SLURM_JOB_ID.log"
rc=${PIPESTATUS[0]}
set -e
if [ -f "$RUN_DIR/stopped.json" ]; then
  echo "checkpoint written before the time limit ($(cat "$RUN_DIR/stopped.json")): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
