"""Pipeline training benchmark: stage overlap against the ideal, and memory against sequence length.

`python -m comet_ds.bench.pipeline worker ...` runs under torchrun (one process per stage) and times
real pipeline training steps on one random sequence; `run_all` starts the workers and compares, all
with the same BPTT window:
  * 2 stages (1 thread each) vs 1 stage (1 thread) on the same sequence, as a fraction of the ideal
    speedup T*S/(T+S-1) for T chunks and S stages (one fill and one drain per step), with the engine's
    schedule and with the draining one it replaced, and vs 1 stage with 2 threads (runs interleaved and
    repeated, best of each kept, since a shared machine's speed drifts);
  * peak RSS per stage for a 32k- and a 1M-token training sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from comet_ds.bench import BENCH_CONFIG
from comet_ds.resources import free_port


def worker(base: str, length: int, steps: int, threads: int, bptt_window: int | None, warmup: bool,
           schedule: str = "1f1b") -> dict:
    import deepspeed
    import deepspeed.comm as dist

    from comet_ds.bench.schedule import DrainingSchedule
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.pretrained import build_comet
    from comet_ds.pipeline.engine import CometPipelineEngine, skip_shm_build
    from comet_ds.pipeline.stages import build_pipeline_module

    torch.set_num_threads(threads)
    skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    stages = dist.get_world_size()
    torch.manual_seed(0)
    model, tokenizer = build_comet(base, BENCH_CONFIG)
    module = build_pipeline_module(model, stages)
    trainable = [p for p in module.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trainable, lr=1e-4), config=config)
    engine = CometPipelineEngine.adopt(engine, bptt_window)
    if schedule == "draining":
        engine.schedule = DrainingSchedule
    rng = random.Random(0)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    ids = [rng.choice(vocab) for _ in range(length)]
    chunks = ChunkLayout(BENCH_CONFIG, model.tokens).layout([ids])
    scale = 1.0 / max(1, sum(c.num_labels for c in chunks))
    if warmup:  # allocations, first-send metadata; memory runs skip it: their peak is the whole step's
        engine.train_step([chunks], scale)
    engine.reset_stage_timers()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step([chunks], scale)
    dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    # the stages' idle share as the engine measures it in training (compute time against the steps' time)
    stats = engine.stage_stats(seconds * steps)
    return {"stages": stages, "threads": threads, "schedule": schedule, "tokens": length, "chunks": len(chunks),
            "bptt_window": bptt_window, "step_seconds": round(seconds, 3), "tokens_per_s": round(length / seconds, 1),
            "bubble_fraction": round(stats["bubble_fraction"], 4),
            "compute_fraction_per_stage": [round(f, 3) for f in stats["compute_fraction"]],
            "transfer_fraction_per_stage": [round(f, 3) for f in stats["transfer_fraction"]],
            "peak_rss_mib_per_stage": [round(p, 1) for p in stats["peak_mem_mib"]]}


def _launch(base: str, stages: int, threads: int, length: int, steps: int, bptt_window: int | None,
            warmup: bool = True, schedule: str = "1f1b") -> dict:
    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", str(stages), "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "comet_ds.bench.pipeline", "worker", "--base", base, "--length", str(length), "--steps", str(steps),
           "--threads", str(threads), "--bptt-window", str(bptt_window or 0), "--schedule", schedule,
           *([] if warmup else ["--no-warmup"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline benchmark failed ({stages} stages, {length} tokens):\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def run_all(base: str, throughput_tokens: int, memory_lengths: list[int], bptt_window: int, steps: int,
            repeats: int = 2) -> dict:
    def show(row: dict) -> dict:
        print(f"  {row['stages']} stage(s) x {row['threads']} thread(s), {row['schedule']:>8}, "
              f"{row['tokens']:>9,} tokens "
              f"({row['chunks']} chunks, window {row['bptt_window']}): {row['tokens_per_s']:>8,.0f} tok/s, "
              f"{row['step_seconds']:.2f} s/step, bubble {row['bubble_fraction']:.3f} (per stage: computing "
              f"{row['compute_fraction_per_stage']}, in transfers {row['transfer_fraction_per_stage']}), "
              f"peak RSS per stage {row['peak_rss_mib_per_stage']} MiB", flush=True)
        return row

    print(f"throughput (BPTT window {bptt_window} chunks, one sequence per step; best of {repeats} interleaved "
          "rounds):")
    configs = ((1, 1, "1f1b"), (2, 1, "1f1b"), (2, 1, "draining"), (1, 2, "1f1b"))
    rounds = [[show(_launch(base, stages, threads, throughput_tokens, steps, bptt_window, schedule=schedule))
               for stages, threads, schedule in configs] for _ in range(repeats)]
    one, two, two_draining, one_wide = (max((r[i] for r in rounds), key=lambda row: row["tokens_per_s"])
                                        for i in range(len(configs)))
    chunks, stages = two["chunks"], 2
    ideal = chunks * stages / (chunks + stages - 1)
    print(f"memory (BPTT window {bptt_window} chunks):")
    memory = [show(_launch(base, 2, 1, length, 1, bptt_window, warmup=False)) for length in memory_lengths]
    summary = {
        "ideal_speedup": round(ideal, 3),
        "speedup_vs_1_stage_1_thread": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "fraction_of_ideal": round(two["tokens_per_s"] / one["tokens_per_s"] / ideal, 3),
        "fraction_of_ideal_draining": round(two_draining["tokens_per_s"] / one["tokens_per_s"] / ideal, 3),
        "speedup_vs_1_stage_2_threads": round(two["tokens_per_s"] / one_wide["tokens_per_s"], 3),
        "peak_rss_ratio_per_stage": [round(b / a, 3) for a, b in zip(memory[0]["peak_rss_mib_per_stage"],
                                                                      memory[-1]["peak_rss_mib_per_stage"])],
    }
    print(json.dumps(summary, indent=2))
    return {"rows": [*(row for r in rounds for row in r), *memory], "summary": summary}


def main() -> None:  # the worker, under torchrun
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bptt-window", type=int, default=0)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--schedule", choices=["1f1b", "draining"], default="1f1b")
    args = parser.parse_args()
    result = worker(args.base, args.length, args.steps, args.threads, args.bptt_window or None, not args.no_warmup,
                    args.schedule)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
