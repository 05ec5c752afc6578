#!/bin/bash
# OLMo-65B on 64 nodes of 8 H100-80GB (512 GPUs): the layout of experiment=olmo_65b, which
# `python -m megaolmo.plan experiment=olmo_65b` checks before launch. From the megaolmo checkout, with
# its environment active:
#   sbatch slurm/olmo65b.sh [hydra overrides ...]
# Logs: slurm-olmo65b-<job id>.out; run: runs/olmo65b/ (sbatch -J NAME for another run).
#SBATCH --job-name=olmo65b
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec bash "${SLURM_SUBMIT_DIR:?run me with sbatch}/slurm/train.sh" experiment=olmo_65b "$@"
