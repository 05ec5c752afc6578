#!/bin/bash
# OLMo-1B on one node of 8 H100-80GB: the layout of experiment=olmo_1b, which
# `python -m megaolmo.plan experiment=olmo_1b` checks before launch. From the megaolmo checkout, with
# its environment active:
#   sbatch slurm/olmo1b.sh [hydra overrides ...]
# Logs: slurm-olmo1b-<job id>.out; run: runs/olmo1b/ (sbatch -J NAME for another run).
#SBATCH --job-name=olmo1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec bash "${SLURM_SUBMIT_DIR:?run me with sbatch}/slurm/train.sh" experiment=olmo_1b "$@"
