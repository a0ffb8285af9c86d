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

Builds the tiny base, then trains six stages, each from the previous stage's adapter, and
evaluates the last one (sequence lengths in tokens: key depth ranges; a chunk is 128 tokens):
  start    384: 0-0.08                         the key in chunk 0, kept through one gated update
  write    512: 0-0.02, 0.23-0.46              half in chunk 0, half in chunk 1 (the gate must open)
  depths   512: four ranges, chunk 0 to the question's chunk
  every    512: the four ranges to depth 1, plus uniform 0-1
  long     512, 1k, 2k (one length a step): five ranges, 0 to 1
  settle   2k: the same five ranges, at half the learning rate
Run it again after an interruption: finished stages are kept, a stage with a checkpoint resumes.

  --out DIR            base, data sets, stages and evaluation (default: runs/curriculum)
  --scale X            multiplies every stage's steps, 8 sequences a step (default: 0.5 = 7,521
                       steps, 1 h 46 min on 2 CPU cores with the evaluation: 100% at 16x and 32x;
                       1 = 15,043 steps; 0.25 is too few: the start stage ends on its plateau)
  --procs N            processes per stage (default: 2, the pipeline stages of the DeepSpeed config)
  --pretrain-steps N   of the tiny base, when DIR/base does not exist yet (default: 2500)
  --eval-lengths LIST  passkey evaluation lengths, 11 depths x 10 samples each (default: 2k,32k,64k,
                       i.e. 1x, 16x and 32x the longest training length)

example (a smoke run of the whole chain in a few minutes):
  launch/examples/passkey_curriculum.sh --out /tmp/cur --scale 0.002 --pretrain-steps 50 --eval-lengths 2k
USAGE
}
out=runs/curriculum scale=0.5 procs=2 pretrain_steps=2500 eval_lengths=2k,32k,64k
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
[ -f "$out/base/config.json" ] || comet-ds init-base --out "$out/base" --pretrain-steps "$pretrain_steps"

count() { echo $(( $(tr -cd , <<<"$1" | wc -c) + 1 )); }  # items in a comma list
previous=""
stage() {  # name, sequence lengths, depth ranges, steps at scale 1, settings of this stage only
  local name=$1 lengths=$2 depths=$3 steps resume=() settings=("${@:5}")
  steps=$(python3 -c "print(max(2, round($4 * $scale)))")
  if [ -d "$out/$name/adapter" ]; then
    echo "== stage $name: done earlier ($out/$name/adapter)"
  else
    if [ -e "$out/$name/checkpoints/latest" ]; then
      echo "== stage $name: resuming from its last checkpoint"
      resume=(--resume)
    else
      echo "== stage $name: $steps steps of 8 x $lengths tokens, key depths $depths"
      local cells=$(( $(count "$lengths") * $(count "$depths") ))
      comet-prep passkey --tokenizer "$out/base" --lengths "$lengths" --depths "$depths" --quiet \
        --samples-per-cell $(( (steps * 8 + cells - 1) / cells )) --output "$out/data/$name" --overwrite
    fi
    "$here/../single_node.sh" --procs "$procs" --config "$here/passkey_stage.yaml" \
      base_model="$out/base" dataset="$out/data/$name" output_dir="$out/$name" train.steps="$steps" \
      ${previous:+init_from="$out/$previous/adapter"} "${settings[@]}" "${resume[@]}"
  fi
  previous=$name
}
stage start 384 0-0.08 3322
stage write 512 0-0.02,0.23-0.46 2133
stage depths 512 0-0.02,0.23-0.46,0.48-0.72,0.75-0.93 4156
stage every 512 0-0.02,0.23-0.46,0.48-0.72,0.75-1,0-1 2978
stage long 512,1k,2k 0-0.02,0.02-0.5,0.5-0.9,0.9-1,0-1 1654
stage settle 2k 0-0.02,0.02-0.5,0.5-0.9,0.9-1,0-1 800 train.lr=1e-3
comet-ds eval passkey --model "$out/settle/adapter" --lengths "$eval_lengths" --depths 11 --samples 10 \
  --out "$out/eval"
