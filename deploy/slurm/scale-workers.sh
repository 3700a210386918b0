#!/bin/bash
# Keeps as many alphawatch GPU workers queued or running in Slurm as there are claimable jobs,
# up to MAX_WORKERS: the Slurm counterpart of KEDA's ScaledJob. Run it every few minutes on a
# login node, e.g. with scrontab:
#
#   */5 * * * * /path/to/alphawatch/deploy/slurm/scale-workers.sh
#
# The count is `alphawatch db queue-depth`: the query /metrics reports as alphawatch_queue_depth.
# Workers end by themselves when the queue stays empty (--exit-when-idle in the sbatch script).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_FILE="${AW_ENV_FILE:-$HOME/.config/alphawatch/env}"
if [[ -f "$ENV_FILE" ]]; then
    set -a
    # shellcheck source=/dev/null
    source "$ENV_FILE"
    set +a
fi
MAX_WORKERS="${MAX_WORKERS:-8}"
ALPHAWATCH="${AW_BIN:-alphawatch}"

depth="$("$ALPHAWATCH" db queue-depth)"
# Workers of ours already pending or running (each array task is one line).
present="$(squeue --noheader --user "$USER" --name alphawatch-worker --array \
    --states PENDING,RUNNING,CONFIGURING | wc -l)"
wanted=$(( depth < MAX_WORKERS ? depth : MAX_WORKERS ))
submit=$(( wanted > present ? wanted - present : 0 ))
if (( submit > 0 )); then
    sbatch --array="0-$(( submit - 1 ))" "$HERE/alphawatch-workers.sbatch"
fi
echo "alphawatch: ${depth} claimable, ${present} workers present, ${submit} submitted"
