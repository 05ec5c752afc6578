#!/usr/bin/env bash
# Stop the one-node Slurm that slurm/local/start.sh started (jobs still running are killed).
set -euo pipefail

if pgrep -x slurmctld > /dev/null; then
  scontrol shutdown || true
fi
for _ in $(seq 30); do
  pgrep -x slurmctld > /dev/null || pgrep -x slurmd > /dev/null || break
  sleep 1
done
pkill -x slurmd 2> /dev/null || true
pkill -x munged 2> /dev/null || true
echo "local Slurm stopped"
