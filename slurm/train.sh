#!/bin/bash
# What every slurm/olmo*.sh runs once Slurm has started it: one megaolmo.train rank per Slurm task
# (srun; each rank reads its rank, its GPU and the rendezvous from Slurm's variables), in
# runs/<job name>/, so a requeued or resubmitted job of the same name resumes from its latest checkpoint.
# When training stops on Slurm's warning signal it saves a checkpoint and exits 75; this script then
# requeues the job.
#   Usage (inside a job): bash slurm/train.sh [hydra overrides ...]
set -uo pipefail

fail() { echo "slurm/train.sh: $*" >&2; exit 2; }
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a Slurm job; submit a recipe instead, e.g. sbatch slurm/olmo65b.sh"
python -c "import megaolmo" 2> /dev/null \
  || fail "python ($(command -v python || echo none)) cannot import megaolmo; activate its environment before sbatch"

run_dir=${MEGAOLMO_RUNS:-$SLURM_SUBMIT_DIR/runs}/$SLURM_JOB_NAME
mkdir -p "$run_dir" || fail "cannot create the run directory $run_dir; set MEGAOLMO_RUNS to a writable folder"

# Defaults that a user's environment overrides.
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
: "${NCCL_DEBUG:=WARN}"
: "${NCCL_IB_TIMEOUT:=22}"                    # ~17 s before an InfiniBand retry gives up, not 4 s
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"     # FSDP2: free collective buffers as soon as they are used
: "${PYTHONUNBUFFERED:=1}"                    # rank 0's log lines reach the job's output as they happen
export OMP_NUM_THREADS NCCL_DEBUG NCCL_IB_TIMEOUT TORCH_NCCL_AVOID_RECORD_STREAMS PYTHONUNBUFFERED

leg=$((${SLURM_RESTART_COUNT:-0} + 1))
echo "$(date -Is) job $SLURM_JOB_ID leg $leg: $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), run dir $run_dir"

# --wait: once one rank has exited, the others get 120 s (a crashed rank must not leave the rest hanging
# on a collective), while ranks stopping together keep their own exit codes.
srun --wait=120 python -m megaolmo.train hydra.run.dir="$run_dir" "$@"
status=$?

if [[ $status == 75 ]]; then
  echo "$(date -Is) job $SLURM_JOB_ID leg $leg: stopped with a checkpoint; requeueing"
  scontrol requeue "$SLURM_JOB_ID" || fail "scontrol requeue $SLURM_JOB_ID failed; resubmit with the same job name to resume"
  exit 0
fi
echo "$(date -Is) job $SLURM_JOB_ID leg $leg: training exited with status $status"
exit "$status"
