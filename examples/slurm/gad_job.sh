# The body of the sbatch scripts (examples/gad_*.sh, examples/seqkd_*.sh): sourced by them, never run alone.
# The calling script sets CONFIG, NODES, GPUS_PER_NODE, TIME_LIMIT (equal to its #SBATCH lines) and HF_MODEL.
#
# Environment (all optional):
#   HF_MODEL         HF directory of the student, converted once to $RUN_DIR/init/student (the first step)
#   DATA             teacher rows (gad-collect output); default: the config's data.train
#   RUN_NAME/RUN_DIR one directory for everything: logs/, TensorBoard, metrics, checkpoints/, init/
#   OVERRIDES        extra dotted config overrides ("rollout.n=4 train.total_steps=100")
#   CONTAINER_IMAGE  pyxis/enroot image (docker://... or .sqsh): every python step runs in it (srun --container-*),
#                    one named container (GAD_CONTAINER_NAME, default gad-$RUN_NAME) reused by every step and requeue;
#                    CONTAINER_MOUNTS replaces the default mounts (the project, the run directory, HF_MODEL, DATA's
#                    directory); CONTAINER_MOUNTS_EXTRA adds to them
#   VENV             else: a virtualenv to activate
#   GPU_TYPE         for the memory plan (h100-80gb, h200, a100-80gb)
#   CKPT_WRITE_GBS   the run directory's write bandwidth (GB/s): the SIGUSR1 lead = checkpoint write + one step
#   GAD_DOCTOR=0     skip the pre-flight checks (gad-doctor, one task per GPU) before training
#   GAD_NCCL_DEBUG=1 NCCL_DEBUG=INFO (which transport NCCL chose, in the logs)
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

# Outside an allocation (DRY_RUN on a login node): stand in for the allocation the #SBATCH lines ask for.
if [ -z "${SLURM_JOB_ID:-}" ]; then
  if [ "$DRY_RUN" != 1 ]; then echo "not inside a Slurm job: submit with sbatch, or DRY_RUN=1" >&2; exit 2; fi
  export SLURM_JOB_ID=0 SLURM_NNODES=$NODES SLURM_JOB_NODELIST="node[1-$NODES]" SLURM_GPUS_ON_NODE=$GPUS_PER_NODE
fi
# The allocation's size, fixed here: inside a one-task helper step SLURM_NNODES / SLURM_GPUS_ON_NODE are the step's.
export GAD_ALLOC_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$NODES}} GAD_ALLOC_GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$GPUS_PER_NODE}
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): every step asks for it.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core's TP / sequence-parallel communication overlap relies on it
if [ "${GAD_NCCL_DEBUG:-0}" = 1 ]; then export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET; fi

if [ -n "${CONTAINER_IMAGE:-}" ]; then
  CTR_NAME=${GAD_CONTAINER_NAME:-gad-$RUN_NAME}
  MOUNTS="$GAD_ROOT:$GAD_ROOT,$RUN_DIR:$RUN_DIR"
  if [ -n "${HF_MODEL:-}" ]; then MOUNTS="$MOUNTS,$HF_MODEL:$HF_MODEL"; fi
  if [ -n "${DATA:-}" ]; then d=$(cd "$(dirname "$DATA")" 2>/dev/null && pwd || dirname "$DATA"); MOUNTS="$MOUNTS,$d:$d"; fi
  MOUNTS=${CONTAINER_MOUNTS:-$MOUNTS}${CONTAINER_MOUNTS_EXTRA:+,$CONTAINER_MOUNTS_EXTRA}
  if [ "$DRY_RUN" != 1 ]; then mkdir -p "$RUN_DIR"; fi  # a mount's source must exist
  SRUN_ENV=(--container-image="$CONTAINER_IMAGE" --container-name="$CTR_NAME" --container-mounts="$MOUNTS"
            --container-workdir="$GAD_ROOT")
  # The helpers (rendezvous, plan) need torch: one task in the container, never the host's python.
  pystep() { srun --nodes=1 --ntasks=1 "${SRUN_ENV[@]}" python "$@"; }
else
  SRUN_ENV=()
  if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; fi
  pystep() { "$PYTHON" "$@"; }
  # A python without the project (the host's, no VENV) would fail in the helper below with a traceback, read as
  # "not inside a Slurm allocation": say what is wrong instead.
  if ! "$PYTHON" -c "import torch, gad_megatron" 2>/dev/null; then
    echo "gad_job.sh: $(command -v "$PYTHON" || echo "$PYTHON") cannot import torch and gad_megatron: set VENV=<the project's virtualenv>, PYTHON=<its python> or CONTAINER_IMAGE=<the image>" >&2
    exit 2
  fi
fi

# MASTER_ADDR (first node), MASTER_PORT (from the job id: a requeued job keeps it), GAD_WORLD_SIZE, ...
# Captured first: inside eval "$(...)" the helper's exit code is lost and set -u fails later on a variable
# it never set ("unbound variable") instead of on its own clear error.
SLURM_LINES=$(pystep -m gad_megatron.runtime.slurm env) || { echo "gad_job.sh: not inside a Slurm allocation (see the error above)" >&2; exit 1; }
eval "$SLURM_LINES"

# The trainer's arguments: one run directory, the converted student, resume from the run's own checkpoints.
TRAIN_ARGS=(--config "$CONFIG" "log.run_dir=$RUN_DIR" "model.student=$INIT_CKPT" "checkpoint.resume=auto"
            "parallel.nproc=$GAD_WORLD_SIZE")
if [ -n "${DATA:-}" ]; then TRAIN_ARGS+=("data.train=$DATA"); fi
read -r -a EXTRA <<< "${OVERRIDES:-}"
TRAIN_ARGS+=("${EXTRA[@]}")

# The layout, its memory plan, checkpoint size and signal lead, from the config and this allocation; a layout
# that does not fit stops here.
PLAN_MODEL=()
if [ -f "${HF_MODEL:-/nonexistent}/config.json" ]; then PLAN_MODEL=(--model "$HF_MODEL"); fi
set +e
PLAN=$(pystep -m gad_megatron.plan --config "$CONFIG" "${PLAN_MODEL[@]}" --gpu "$GPU_TYPE" \
       --nodes "$GAD_NUM_NODES" --gpus-per-node "$GAD_GPUS_PER_NODE" --ckpt-write-gbs "${CKPT_WRITE_GBS:-2.0}" \
       --shell "${EXTRA[@]}" ${DATA:+"data.train=$DATA"})
PLAN_RC=$?
set -e
if [ "$PLAN_RC" -ne 0 ] && [ -z "$PLAN" ]; then  # gad-plan refused the config (its error is above): no layout to read
  echo "gad_job.sh: gad-plan refused the config $CONFIG${OVERRIDES:+ with OVERRIDES=\"$OVERRIDES\"} (see its error above); nothing was started" >&2
  exit 2
fi
eval "$PLAN"  # TP PP DP ROLLOUT_TP WORLD FITS PEAK_GIB LAYOUT RUN_HOURS CKPT_GB CKPT_WRITE_S STEP_S SIGNAL_LEAD_S DISK_NEED_GB
echo "job $SLURM_JOB_ID: $GAD_NUM_NODES node(s) x $GAD_GPUS_PER_NODE GPU(s) = world $GAD_WORLD_SIZE; rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "layout: $LAYOUT (TP=$TP PP=$PP DP=$DP rollout TP=$ROLLOUT_TP); memory peak $PEAK_GIB GiB per GPU on $GPU_TYPE; predicted run $RUN_HOURS h"
echo "checkpoint: ${CKPT_GB:-?} GB, ~${CKPT_WRITE_S:-?} s to write; SIGUSR1 ${SIGNAL_LEAD_S:-?} s before the time limit (write + one ${STEP_S:-?} s step + slack); disk needed ${DISK_NEED_GB:-?} GB"
echo "run directory: $RUN_DIR (logs/, tensorboard/, metrics.jsonl, checkpoints/, init/)"
if [ "$PLAN_RC" -ne 0 ] || [ "$FITS" != 1 ]; then
  echo "error: this layout does not fit $GAD_NUM_NODES x $GAD_GPUS_PER_NODE $GPU_TYPE (gad-plan --config $CONFIG --nodes $GAD_NUM_NODES --search lists those that do)" >&2
  exit 1
fi

# The time limit (squeue in a job; TIME_LIMIT from the sbatch script otherwise): a longer run is carried on by
# requeues, each resuming from the last checkpoint. Slurm's formats: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]].
limit_hours() {
  local t=$1 d=0 h=0 m=0
  if [[ $t == *-* ]]; then d=${t%%-*}; t=${t#*-}; IFS=: read -r h m _ <<< "$t"
  else IFS=: read -r a b c <<< "$t"; if [ -n "${c:-}" ]; then h=$a m=$b; else m=$a; fi; fi
  echo $(( (10#$d * 24 + 10#${h:-0}) * 60 + 10#${m:-0} ))
}
LIMIT=${TIME_LIMIT:-}
if [ "$SLURM_JOB_ID" != 0 ] && command -v squeue >/dev/null; then LIMIT=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || echo "$LIMIT"); fi
if [ -n "$LIMIT" ] && [[ $LIMIT =~ ^[0-9] ]]; then
  LIMIT_MIN=$(limit_hours "$LIMIT")
  RUN_MIN=$(awk -v h="$RUN_HOURS" 'BEGIN { printf "%d", h * 60 + 0.5 }')
  if [ "$RUN_MIN" -gt "$LIMIT_MIN" ]; then
    echo "warning: the predicted run ($RUN_HOURS h) exceeds the job's time limit ($LIMIT): it goes on in $(( (RUN_MIN + LIMIT_MIN - 1) / LIMIT_MIN - 1 )) requeue(s), each resuming from the last checkpoint" >&2
  fi
fi

# Step 1 (once): HF -> megatron at the training layout, TP*PP ranks on as few nodes as hold them.
CONV_TASKS=$((TP * PP))
CONV_NODES=$(( (CONV_TASKS + GAD_GPUS_PER_NODE - 1) / GAD_GPUS_PER_NODE ))
CONVERT_CMD=(srun --nodes="$CONV_NODES" --ntasks="$CONV_TASKS" --ntasks-per-node=$(( CONV_TASKS < GAD_GPUS_PER_NODE ? CONV_TASKS : GAD_GPUS_PER_NODE ))
             "${SRUN_ENV[@]}" gad-convert hf-to-mcore --hf "${HF_MODEL:-HF_MODEL_NOT_SET}" --out "$INIT_CKPT" --tp "$TP" --pp "$PP"
             --device cuda)
# Step 2: the pre-flight checks, one task per GPU, on the run's own config (GAD_DOCTOR=0 skips them).
DOCTOR_CMD=(srun --nodes="$GAD_NUM_NODES" --ntasks-per-node="$GAD_GPUS_PER_NODE" "${SRUN_ENV[@]}" gad-doctor
            "${TRAIN_ARGS[@]}")
# Step 3: every GPU one rank (srun-native: RANK/LOCAL_RANK from SLURM_PROCID/SLURM_LOCALID). SIGUSR1 arrives
# SIGNAL_LEAD_S before the time limit (the planner's checkpoint write time + one step + slack): each rank finishes
# its step, the checkpoint is written, the trainer exits 0 leaving $RUN_DIR/stopped.json, and this script
# requeues the job, which resumes.
TRAIN_CMD=(srun --nodes="$GAD_NUM_NODES" --ntasks-per-node="$GAD_GPUS_PER_NODE" --kill-on-bad-exit=1
           --signal=USR1@"$SIGNAL_LEAD_S" "${SRUN_ENV[@]}" gad-train "${TRAIN_ARGS[@]}")
NEED_CONVERT=1
if [ -f "$INIT_CKPT/latest_checkpointed_iteration.txt" ]; then NEED_CONVERT=0; fi

if [ "$DRY_RUN" = 1 ]; then
  if [ "$NEED_CONVERT" = 1 ]; then echo "command: $(printf '%q ' "${CONVERT_CMD[@]}")"; fi
  if [ "${GAD_DOCTOR:-1}" != 0 ]; then echo "command: $(printf '%q ' "${DOCTOR_CMD[@]}")"; fi
  echo "command: $(printf '%q ' "${TRAIN_CMD[@]}")"
  exit 0
fi

mkdir -p "$RUN_DIR/logs"
if [ "$NEED_CONVERT" = 1 ]; then
  : "${HF_MODEL:?set HF_MODEL to the student HF directory (the first run converts it)}"
  "${CONVERT_CMD[@]}" 2>&1 | tee -a "$RUN_DIR/logs/convert-$SLURM_JOB_ID.log"
fi
if [ "${GAD_DOCTOR:-1}" != 0 ]; then
  set +e
  "${DOCTOR_CMD[@]}" 2>&1 | tee -a "$RUN_DIR/logs/doctor-$SLURM_JOB_ID.log"
  doctor_rc=${PIPESTATUS[0]}
  set -e
  if [ "$doctor_rc" -ne 0 ]; then echo "gad-doctor found a FAIL (above; $RUN_DIR/doctor.json): not training" >&2; exit 1; fi
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
