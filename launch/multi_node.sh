#!/usr/bin/env bash
# Train across the nodes of a DeepSpeed hostfile ("HOST slots=N" per line).
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/multi_node.sh --hostfile FILE --master-addr ADDR [--port PORT] [--node-rank R]
                            --config RUN.yaml [KEY=VALUE ...] [--resume]

With passwordless ssh, run it once on the first node: the deepspeed launcher starts every node.
Without ssh, run it on every node with --node-rank 0, 1, ... (each node starts its own processes).
The output_dir of the run config must be on a filesystem every node can write (checkpoints).
  --hostfile FILE      DeepSpeed hostfile: one "HOST slots=N" line per node
  --master-addr ADDR   address of node 0, reachable from every node
  --port PORT          rendezvous port (default: 29500)
  --node-rank R        this node's index in the hostfile; implies no ssh

example (two nodes, no ssh):
  node0$ launch/multi_node.sh --hostfile hosts --master-addr 10.0.0.1 --node-rank 0 --config RUN.yaml
  node1$ launch/multi_node.sh --hostfile hosts --master-addr 10.0.0.1 --node-rank 1 --config RUN.yaml
USAGE
}
hostfile="" master="" port=29500 node_rank="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    --master-addr) master=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$hostfile" ] || [ -z "$master" ] || [ ${#args[@]} -eq 0 ]; then usage >&2; exit 2; fi
[ -f "$hostfile" ] || { echo "multi_node.sh: hostfile $hostfile does not exist" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
no_ssh=()
[ -n "$node_rank" ] && no_ssh=(--no_ssh --node_rank "$node_rank")
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "$port" "${no_ssh[@]}" \
  --no_local_rank --module comet_ds.cli train "${args[@]}"
