#!/usr/bin/env bash
# Two "nodes" on this one machine over loopback (machine_rank 0 and 1), for testing the multi-node path:
#   bash launch/loopback_2nodes.sh PROCS_PER_NODE [hydra overrides...]
#   bash launch/loopback_2nodes.sh 1 pipeline.stages=2 output_dir=outputs/loopback   # pp=2, one stage per node
#   bash launch/loopback_2nodes.sh 2 pipeline.stages=2 output_dir=outputs/loopback   # pp=2 x dp=2
# Exits non-zero if either node does; when one node fails the other is stopped.
set -uo pipefail
per_node=${1:?usage: $0 PROCS_PER_NODE [overrides...]}
shift
here="$(cd "$(dirname "$0")" && pwd)"
port=${MAIN_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export MAIN_PORT=$port
bash "$here/node.sh" 0 2 127.0.0.1 "$per_node" "$@" & a=$!
bash "$here/node.sh" 1 2 127.0.0.1 "$per_node" "$@" & b=$!
status=0
# When one node fails, the other one's ranks notice by themselves (heartbeats, see README) and
# exit; as a last resort it is stopped after GRACE_S seconds (default 90) so this script never hangs.
wait -n $a $b || status=$?
if [ $status -ne 0 ]; then
  ( sleep "${GRACE_S:-90}"; kill -TERM $a $b ) >/dev/null 2>&1 &
  timer=$!
fi
wait $a || status=$((status ? status : $?))
wait $b || status=$((status ? status : $?))
if [ -n "${timer:-}" ]; then kill $timer 2>/dev/null; fi
exit $status
