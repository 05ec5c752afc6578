#!/bin/bash
# Tokenize Dolma at full size as a Slurm array: array task i of n runs python -m megaolmo.data.prepare on
# every n-th input shard (--shard-index i --num-shards n), all into one output directory; the task that
# commits the last shard writes metadata.json. From the megaolmo checkout, with its environment active:
#   sbatch --array=0-63 slurm/prepare_dolma.sh /data/dolma/v1_7 --out data/dolma --tokenizer tokenizer.json
# To train the tokenizer instead, do it once first (a sample of the inputs), then submit the same arguments:
#   python -m megaolmo.data.prepare /data/dolma/v1_7 --out data/dolma --train-tokenizer 50280 --tokenizer-only
#   sbatch --array=0-63 slurm/prepare_dolma.sh /data/dolma/v1_7 --out data/dolma --train-tokenizer 50280
# Each task runs one worker per CPU of its allocation, one tokenizer thread each. Two minutes before its
# time limit a task is told to stop (SIGTERM), keeps its committed shards and requeues itself; the requeued
# task resumes. Logs: slurm-prepare_dolma-<array job>_<task>.out.
#SBATCH --job-name=prepare_dolma
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail

fail() { echo "slurm/prepare_dolma.sh: $*" >&2; exit 2; }
[[ -n ${SLURM_ARRAY_TASK_ID:-} ]] \
  || fail "not an array task; submit with sbatch --array=0-<parts - 1> slurm/prepare_dolma.sh INPUT... --out DIR ..."
python -c "import megaolmo" 2> /dev/null \
  || fail "python ($(command -v python || echo none)) cannot import megaolmo; activate its environment before sbatch"

# Part index and count from the array's own range, so --array=1-64 works as well as --array=0-63.
parts=${SLURM_ARRAY_TASK_COUNT:?}
part=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
(( SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1 == parts )) \
  || fail "the array must be one contiguous range (e.g. --array=0-63, a %limit is fine), not a list or a step"
workers=${PREPARE_WORKERS:-${SLURM_CPUS_PER_TASK:-1}}

: "${PYTHONUNBUFFERED:=1}"  # each shard's progress line reaches the log as it is committed
export PYTHONUNBUFFERED
cd "${SLURM_SUBMIT_DIR:?run me with sbatch}" || fail "cannot enter the submit directory $SLURM_SUBMIT_DIR"
leg=$((${SLURM_RESTART_COUNT:-0} + 1))
echo "$(date -Is) job $SLURM_JOB_ID leg $leg: part $part of $parts, $workers workers on $(hostname)"

# prepare runs in the background so this shell can pass Slurm's warning on to it and wait for it to stop.
python -m megaolmo.data.prepare "$@" --workers "$workers" --threads-per-worker 1 \
  --shard-index "$part" --num-shards "$parts" &
pid=$!
stopping=
trap 'stopping=1; kill -TERM "$pid" 2> /dev/null' TERM
wait "$pid"
status=$?
if [[ -n $stopping ]]; then
  wait "$pid"  # the trap interrupted the first wait: this one returns prepare's own status
  status=$?
fi

if [[ $status == 143 ]]; then  # stopped by the warning signal, committed shards kept
  echo "$(date -Is) job $SLURM_JOB_ID leg $leg: part $part stopped at the time limit; requeueing"
  scontrol requeue "$SLURM_JOB_ID" || fail "scontrol requeue $SLURM_JOB_ID failed; resubmit the same array to resume"
  exit 0
fi
echo "$(date -Is) job $SLURM_JOB_ID leg $leg: part $part exited with status $status"
exit "$status"
