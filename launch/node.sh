#!/usr/bin/env bash
# One node of a multi-node run: bash launch/node.sh MACHINE_RANK NUM_MACHINES MAIN_IP PROCS_PER_NODE [overrides...]
#   node A: bash launch/node.sh 0 2 10.0.0.1 8 pipeline.stages=4 output_dir=/shared/runs/x
#   node B: bash launch/node.sh 1 2 10.0.0.1 8 pipeline.stages=4 output_dir=/shared/runs/x
# Set MAIN_PORT (default 29500). Without GPUs DeepSpeed falls back to its CPU accelerator (gloo).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 MACHINE_RANK NUM_MACHINES MAIN_IP PROCS_PER_NODE [hydra overrides...]" >&2
  exit 2
fi
machine_rank=$1 num_machines=$2 main_ip=$3 per_node=$4
shift 4
here="$(cd "$(dirname "$0")/.." && pwd)"
exec accelerate launch --use_deepspeed --deepspeed_multinode_launcher standard \
  --num_machines "$num_machines" --machine_rank "$machine_rank" \
  --main_process_ip "$main_ip" --main_process_port "${MAIN_PORT:-29500}" \
  --num_processes $((num_machines * per_node)) \
  "$here/recipes/finetune.py" "$@"
