#!/bin/bash
# OLMo-2 7B on 8 nodes of 8 H100-80GB (64 GPUs): the layout of experiment=olmo2_7b, which
# `python -m megaolmo.plan experiment=olmo2_7b` checks before launch. From the megaolmo checkout, with
# its environment active:
#   sbatch slurm/olmo2_7b.sh [hydra overrides ...]
# Logs: slurm-olmo2_7b-<job id>.out; run: runs/olmo2_7b/ (sbatch -J NAME for another run).
#SBATCH --job-name=olmo2_7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec bash "${SLURM_SUBMIT_DIR:?run me with sbatch}/slurm/train.sh" experiment=olmo2_7b "$@"
