#!/usr/bin/env bash
# The GPU check of docs/BENCHMARKS.md ("GPU"): the CUDA tests, then `comet-ds bench gpu` at the Qwen3-0.6B
# and Qwen3-4B shapes, about 9 minutes on one NVIDIA H200.
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/bench_gpu.sh [OUT]

Run from the repository root on a machine with one CUDA GPU. Needs torch (CUDA), transformers, peft,
sentencepiece, matplotlib, psutil, pyyaml and pytest; DeepSpeed, datasets and MLflow are not used. Writes
into OUT (default: runs/bench-gpu):
  tests.log                      the CUDA tests of tests/test_gpu.py (a failure does not stop the measurements)
  qwen3-0.6b/results.json        kernels, prefill 32k..1M against full attention, decode, training
  qwen3-0.6b/{prefill,training}.png
  qwen3-4b/results.json          kernels, prefill 32k, 128k, 1M against full attention, decode (no training)
  qwen3-4b/prefill.png
Measuring budgets, in seconds: SMALL_BUDGET_S (default 210) and LARGE_BUDGET_S (default 110); a run
predicted to overrun its budget is skipped and listed as such. PYTHON picks the interpreter (default: python3).
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
out=${1:-runs/bench-gpu}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
"$python" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none: this script needs a GPU")
PY
"$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_gpu.py 2>&1 | tee "$out/tests.log" || true
"$python" -m comet_ds bench gpu --shape qwen3-0.6b --budget-s "${SMALL_BUDGET_S:-210}" --out "$out/qwen3-0.6b"
# 512k is left out at 4B: its time goes to 1M, the length the paper's memory claim is about
"$python" -m comet_ds bench gpu --shape qwen3-4b --lengths 32k,128k,1m --no-training \
  --budget-s "${LARGE_BUDGET_S:-110}" --out "$out/qwen3-4b"
rm -f "$out"/*/.comet_ds-output.json  # the results alone: 8 files in all
