#!/usr/bin/env bash
# Train on one machine with the deepspeed launcher: one process per GPU, or --procs processes on CPU.
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/single_node.sh [--procs N] [--port PORT] --config RUN.yaml [KEY=VALUE ...] [--resume] [--dry-run]

Starts `comet-ds train` under the deepspeed launcher on this machine.
  --procs N     processes (default: the number of GPUs, or 2 on a machine without GPUs);
                pipeline stages come from the DeepSpeed config, the rest are data-parallel replicas
  --port PORT   rendezvous port (default: 29500)
Everything else goes to `comet-ds train` (see `comet-ds train --help`).

example: launch/single_node.sh --procs 2 --config launch/examples/tiny_cpu.yaml train.steps=20
USAGE
}
procs="" port=29500 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --procs) procs=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -gt 0 ] || { usage >&2; exit 2; }
if [ -z "$procs" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then procs=$(nvidia-smi -L | wc -l); else procs=2; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$procs" --master_port "$port" --no_local_rank --module comet_ds.cli train "${args[@]}"
