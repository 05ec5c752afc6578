#!/bin/bash
# OLMo-3 7B's 65536-token long-context extension on 8 nodes of 8 H200 (64 GPUs): the layout of
# experiment=olmo3_7b_long_context (CP8 inside a node x DP8), which
# `python -m megaolmo.plan experiment=olmo3_7b_long_context` checks before launch. It continues a pretrained
# 8192-token OLMo-3 7B: from the megaolmo checkout, with its environment active,
#   sbatch slurm/olmo3_7b_long_context.sh trainer.init_from=/path/to/checkpoint data.paths=[...] [hydra overrides ...]
# Logs: slurm-olmo3_7b_long_context-<job id>.out; run: runs/olmo3_7b_long_context/ (sbatch -J NAME for another run).
#SBATCH --job-name=olmo3_7b_long_context
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
exec bash "${SLURM_SUBMIT_DIR:?run me with sbatch}/slurm/train.sh" experiment=olmo3_7b_long_context "$@"
