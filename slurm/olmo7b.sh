#!/bin/bash
# OLMo-7B on 8 nodes of 8 H100-80GB (64 GPUs): the layout of experiment=olmo_7b, which
# `python -m megaolmo.plan experiment=olmo_7b` checks before launch. From the megaolmo checkout, with
# its environment active:
#   sbatch slurm/olmo7b.sh [hydra overrides ...]
# Logs: slurm-olmo7b-<job id>.out; run: runs/olmo7b/ (sbatch -J NAME for another run).
#SBATCH --job-name=olmo7b
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
exec bash "${SLURM_SUBMIT_DIR:?run me with sbatch}/slurm/train.sh" experiment=olmo_7b "$@"
