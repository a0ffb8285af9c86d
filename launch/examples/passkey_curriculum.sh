#!/usr/bin/env bash
# The staged passkey curriculum that teaches the tiny base to write a key into the global memory at
# any depth and keep it (docs/BENCHMARKS.md, "Every depth"). Each stage starts from the previous
# stage's adapter (init_from) on new data; depths are ranges each sample draws from.
# Needs the package on PATH (make install; . .venv/bin/activate).
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/examples/passkey_curriculum.sh [--out DIR] [--scale X] [--procs N] [--pretrain-steps N]
                                             [--eval-lengths LIST]

Builds the tiny base, then trains four stages, each from the previous stage's adapter, and
evaluates the last one (sequence length in tokens: key depth ranges; a chunk is 128 tokens):
  start    384: 0-0.08                         the key in chunk 0, kept through one gated update
  write    512: 0-0.02, 0.23-0.46              half in chunk 0, half in chunk 1 (the gate must open)
  depths   512: four ranges, chunk 0 to the question's chunk
  every    512: the four ranges to depth 1, plus uniform 0-1

  --out DIR            base, data sets, stages and evaluation (default: runs/curriculum)
  --scale X            multiplies every stage's steps (default: 1 = 12,589 steps of 8 sequences)
  --procs N            processes per stage (default: 2, the pipeline stages of the DeepSpeed config)
  --pretrain-steps N   of the tiny base, when DIR/base does not exist yet (default: 2500)
  --eval-lengths LIST  passkey evaluation lengths, 11 depths x 10 samples each (default: 512,8k,16k,
                       i.e. 1x, 16x and 32x the training length)

example (a smoke run of the whole chain in a few minutes):
  launch/examples/passkey_curriculum.sh --out /tmp/cur --scale 0.002 --pretrain-steps 50 --eval-lengths 512
USAGE
}
out=runs/curriculum scale=1 procs=2 pretrain_steps=2500 eval_lengths=512,8k,16k
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) out=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --procs) procs=$2; shift 2 ;;
    --pretrain-steps) pretrain_steps=$2; shift 2 ;;
    --eval-lengths) eval_lengths=$2; shift 2 ;;
    *) usage >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)  # so the script runs from any directory
[ -f "$out/base/config.json" ] || comet-ds init-base --out "$out/base" --pretrain-steps "$pretrain_steps"

previous=""
stage() {  # name, sequence length, depth ranges, steps at scale 1
  local name=$1 length=$2 depths=$3 steps
  steps=$(python3 -c "print(max(2, round($4 * $scale)))")
  local ranges=$(( $(tr -cd , <<<"$depths" | wc -c) + 1 ))
  echo "== stage $name: $steps steps of 8 x $length tokens, key depths $depths"
  comet-prep passkey --tokenizer "$out/base" --lengths "$length" --depths "$depths" --quiet \
    --samples-per-cell $(( (steps * 8 + ranges - 1) / ranges )) --output "$out/data/$name"
  "$here/../single_node.sh" --procs "$procs" --config "$here/passkey_stage.yaml" \
    base_model="$out/base" dataset="$out/data/$name" output_dir="$out/$name" train.steps="$steps" \
    deepspeed_config="$root/ds_configs/cpu_fp32_2stage.json" \
    ${previous:+init_from="$out/$previous/adapter"}
  previous=$name
}
stage start 384 0-0.08 3322
stage write 512 0-0.02,0.23-0.46 2133
stage depths 512 0-0.02,0.23-0.46,0.48-0.72,0.75-0.93 4156
stage every 512 0-0.02,0.23-0.46,0.48-0.72,0.75-1,0-1 2978
comet-ds eval passkey --model "$out/every/adapter" --lengths "$eval_lengths" --depths 11 --samples 10 \
  --out "$out/eval"
