#!/usr/bin/env bash
# Start a one-node Slurm on this machine (munge, slurmctld, slurmd from Debian's slurm-wlm), to try
# megaolmo's sbatch scripts and Hydra sweeps without a cluster. Run as root; idempotent.
#   bash slurm/local/start.sh [CPUS]     # CPUS: task slots to declare (default 8)
set -euo pipefail

cpus=${1:-8}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() { echo "slurm/local/start.sh: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || fail "must run as root (slurmd runs jobs as their user); e.g. sudo bash $0"
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" > /dev/null || fail "$tool not found; install it with: apt-get install -y slurm-wlm munge"
done
[[ $cpus =~ ^[1-9][0-9]*$ ]] || fail "CPUS=$cpus is not a positive integer"

if sinfo -h -o %t 2> /dev/null | grep -qx idle; then
  echo "local Slurm already running: $(sinfo -h -o '%P %D %c %t')"
  exit 0
fi

# munge: the shared secret every Slurm daemon and client signs its messages with.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  su -s /bin/sh munge -c /usr/sbin/munged
fi

host=$(hostname -s)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/" -e "s/@MEMORY_MB@/$memory_mb/" \
  "$here/slurm.conf.in" > /etc/slurm/slurm.conf

pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd

for _ in $(seq 60); do
  if sinfo -h -o %t 2> /dev/null | grep -qx idle; then
    echo "local Slurm up: $(sinfo -h -o '%P %D %c %t') on $host"
    exit 0
  fi
  sleep 1
done
fail "the node did not come up idle within 60 s; see /var/log/slurm/slurmctld.log and slurmd.log"
