"""Streaming-forward benchmark: peak memory and throughput against sequence length.

Each length runs in a fresh process. The process's peak RSS is reset (Linux VmHWM) after the model
is built and one warm-up chunk has run, so the peak reported is the whole process's resident memory
at its highest *during the streaming forward*, not during model loading.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import torch

from comet_ds.bench import BENCH_CONFIG
from comet_ds.config import CometConfig
from comet_ds.resources import peak_rss_mib, reset_peak_memory, rss_mib
from data_prep.argtypes import token_count


def run_one(base: str, length: int, config: CometConfig, seed: int = 0) -> dict[str, float]:
    """Stream one random sequence of `length` tokens through the CoMeT model; measure it."""
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.pretrained import build_comet

    torch.manual_seed(seed)
    model, tokenizer = build_comet(base, config)
    model.eval()
    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    ids = [rng.choice(vocab) for _ in range(length)]
    layout = ChunkLayout(config, model.tokens)
    with torch.inference_mode():
        model(layout.iter_chunks([ids[: config.chunk_size]]))  # warm-up: first-call allocations
        baseline = rss_mib()
        reset_peak_memory()
        start = time.perf_counter()
        out = model(layout.iter_chunks([ids]))
        seconds = time.perf_counter() - start
    return {"tokens": length, "chunks": layout.num_chunks(length), "seconds": round(seconds, 3),
            "tokens_per_s": round(length / seconds, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_growth_mib": round(max(0.0, peak_rss_mib() - baseline), 1), "loss": round(out.loss.item(), 4)}


def run_all(base: str, lengths: list[int], threads: int) -> list[dict[str, float]]:
    """Run each length in its own process; return their result rows."""
    rows = []
    for length in lengths:
        cmd = [sys.executable, "-m", "comet_ds.bench.forward", "--base", base, "--length", str(length),
               "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark at {length} tokens failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict[str, float]) -> str:
    return (f"{row['tokens']:>9,} tokens  {row['chunks']:>5} chunks  {row['tokens_per_s']:>9,.0f} tok/s  "
            f"peak RSS {row['peak_rss_mib']:>7.1f} MiB  growth {row['rss_growth_mib']:>6.1f} MiB")


def main() -> None:  # one length, in this process (called by run_all)
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--length", type=token_count, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(run_one(args.base, args.length, BENCH_CONFIG)))


if __name__ == "__main__":
    main()
