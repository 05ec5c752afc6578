#!/bin/bash
# Offline evaluation of a checkpoint on one node of 8 GPUs: `python -m megaolmo.eval` with one rank per GPU,
# the model sharded over --tp x --pp ranks as in training and the remaining ranks data parallel, so
# OLMo-65B (~130 GB in bf16) evaluates on 80 GB GPUs. From the megaolmo checkout, with its environment
# active, pass the evaluation's own arguments:
#   sbatch slurm/eval.sh perplexity runs/olmo65b/final paloma/ --tokenizer tokenizer.json --tp 8 --out ppl.json
#   sbatch slurm/eval.sh downstream runs/olmo65b/final tasks/ --tokenizer tokenizer.json --tp 4 --pp 2
# Logs: slurm-eval-<job id>.out (the table); --out writes the results as JSON.
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

fail() { echo "slurm/eval.sh: $*" >&2; exit 2; }
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a Slurm job; submit it: sbatch slurm/eval.sh perplexity CKPT DOCS --tokenizer T"
[[ $# -gt 0 ]] || fail "no evaluation arguments; e.g. sbatch slurm/eval.sh perplexity CKPT DOCS --tokenizer T --tp 8"
python -c "import megaolmo" 2> /dev/null \
  || fail "python ($(command -v python || echo none)) cannot import megaolmo; activate its environment before sbatch"

: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
: "${NCCL_DEBUG:=WARN}"
: "${PYTHONUNBUFFERED:=1}"
export OMP_NUM_THREADS NCCL_DEBUG PYTHONUNBUFFERED

echo "$(date -Is) job $SLURM_JOB_ID: evaluating on $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES node(s): $*"
# --wait: once one rank has exited, the others get 120 s rather than hanging on a collective.
exec srun --wait=120 python -m megaolmo.eval "$@"
