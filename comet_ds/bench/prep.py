"""data_prep benchmark: generated raw logs through `comet-prep`, against the tokenizer's own speed.

Each run is a fresh `comet-prep` process whose peak RSS is read from wait4(), so every input size is
measured on its own. The tokenizer baseline encodes the dataset's own `text` column in batches:
the same rendered text the command tokenised, without parsing, grouping or writing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEHAVIORS = ("pv",) * 17 + ("cart", "fav", "buy")  # about the Taobao mix: mostly page views
EVENTS_PER_USER = 150
AGENT_TOOLS = ("search", "weather", "calculator", "read_file", "send_email")


def write_user_behavior_csv(path: Path, megabytes: float, seed: int = 0) -> int:
    """Taobao-layout events (no header) up to `megabytes`; returns the event count.

    Users keep ~EVENTS_PER_USER events each whatever the size, so a bigger file means more users,
    as with real logs, and per-user work stays the same.
    """
    rng = random.Random(seed)
    target, written, events = megabytes * 2**20, 0, 0
    users = max(1, int(target / 40 / EVENTS_PER_USER))  # ~40 bytes per line
    start = 1_511_539_200  # 2017-11-25, the Taobao data's first day
    with open(path, "w", buffering=1 << 20) as out:
        while written < target:
            lines = []
            for _ in range(10_000):
                user = rng.randrange(users)
                lines.append(f"{user},{rng.randrange(5_000_000)},{rng.randrange(10_000)},{rng.choice(BEHAVIORS)},"
                             f"{start + rng.randrange(9 * 86_400)}\n")
            block = "".join(lines)
            out.write(block)
            written += len(block)
            events += len(lines)
    return events


def write_agent_log_jsonl(path: Path, megabytes: float, seed: int = 0) -> int:
    """OpenAI-format trajectories with tool calls and results up to `megabytes`; returns the count."""
    rng = random.Random(seed)
    target, written, count = megabytes * 2**20, 0, 0
    with open(path, "w", buffering=1 << 20) as out:
        while written < target:
            messages = [{"role": "system", "content": "You are a careful agent."},
                        {"role": "user", "content": f"Task {count}: gather facts and summarise them."}]
            for step in range(rng.randint(4, 12)):
                tool, call_id = rng.choice(AGENT_TOOLS), f"call-{count}-{step}"
                messages.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": tool, "arguments": json.dumps({"query": f"item {rng.randrange(1000)}"})}}]})
                result = ({"error": "timeout"} if rng.random() < 0.1 else
                          {"result": " ".join(f"value{rng.randrange(100)}" for _ in range(rng.randint(5, 40)))})
                messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)})
            messages.append({"role": "assistant", "content": f"Done: {rng.randrange(10**6)} facts gathered."})
            line = json.dumps({"id": f"run-{count}", "messages": messages}) + "\n"
            out.write(line)
            written += len(line)
            count += 1
    return count


def generated_inputs(workdir: Path, user_behavior_mb: list[float], agent_logs_mb: float) -> list[tuple[str, Path]]:
    """(comet-prep command, input file) for each benchmark input in `workdir`: a user-behaviour CSV per size
    and, unless `agent_logs_mb` is 0, an agent-log JSONL."""
    inputs = [("user-behavior", _generated(workdir / f"user-behavior-{mb:g}mb.csv", write_user_behavior_csv, mb))
              for mb in user_behavior_mb]
    if agent_logs_mb:
        path = workdir / f"agent-logs-{agent_logs_mb:g}mb.jsonl"
        inputs.append(("agent-logs", _generated(path, write_agent_log_jsonl, agent_logs_mb)))
    return inputs


def _generated(path: Path, write: Callable[[Path, float], int], megabytes: float) -> Path:
    """`path`, written unless an earlier run left it: generating hundreds of MB takes a while."""
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        write(path, megabytes)
    return path


def run_prep(args: list[str]) -> dict[str, float]:
    """Run `comet-prep ARGS` in a fresh process: wall seconds and that process's peak RSS.

    Its output goes to files, not pipes: wait4() must not wait on a child blocked on a full pipe.
    The child's peak RSS starts at this process's size (the kernel carries the high-water mark over
    fork and exec), so everything big, the tokenizer baseline included, runs in children of its own.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "data_prep", *args, "--quiet"], stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"comet-prep {args[0]} failed:\n{err.read()[-2000:]}")
        summary = out.read().strip().splitlines()[-1]
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "summary": summary}


def tokenizer_tokens_per_s(dataset_dir: Path, tokenizer_dir: str, parallel: bool = True,
                           api: str = "call") -> float:
    """The tokenizer alone on the dataset's own rendered text, measured in a fresh process: with its
    own threads on every core (its default), or on one thread (TOKENIZERS_PARALLELISM=false).

    api "call" is the Hugging Face tokenizer's batch call, `tokenizer(texts)`; "fast" is the Rust
    tokenizer's `encode_batch_fast` (no character offsets), the call comet-prep itself makes.
    """
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if not parallel:
        env["TOKENIZERS_PARALLELISM"] = "false"
    result = subprocess.run([sys.executable, "-m", "comet_ds.bench.prep", str(dataset_dir), tokenizer_dir, api],
                            capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"tokenizer baseline failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _tokenizer_baseline(dataset_dir: Path, tokenizer_dir: str, api: str, batch_size: int = 256,
                        sample_texts: int = 2048, repeats: int = 3) -> float:
    """Best of `repeats` batch-encoding passes over the first `sample_texts` texts: a rate needs no
    more, and the best pass is the least disturbed."""
    from datasets import load_from_disk

    if api == "call":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False, split_special_tokens=True).input_ids
    else:
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        rust.encode_special_tokens = True  # as comet-prep encodes: special tokens' strings stay text

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=False)]
    texts = load_from_disk(str(dataset_dir / "data")).select_columns(["text"])[:sample_texts]["text"]
    best = 0.0
    for _ in range(repeats):
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(texts), batch_size):
            tokens += sum(len(ids) for ids in encode(texts[i:i + batch_size]))
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def bench_one(kind: str, source: Path, tokenizer_dir: str, workdir: Path, num_proc: int) -> dict[str, Any]:
    out = workdir / f"{source.stem}-dataset"
    # one question per history and 100 events at most: the output stays ~1 token per input byte
    extra = ["--questions-per-user", "1", "--max-events-per-user", "100"] if kind == "user-behavior" else []
    run = run_prep([kind, str(source), "--tokenizer", tokenizer_dir, "--output", str(out), "--overwrite",
                    "--num-proc", str(num_proc), *extra])
    manifest = json.loads((out / "manifest.json").read_text())
    megabytes = source.stat().st_size / 2**20
    row = {"command": kind, "input_mb": round(megabytes, 1), "samples": manifest["samples"],
           "tokens": manifest["tokens"]["total"], "seconds": round(run["seconds"], 1),
           "mb_per_s": round(megabytes / run["seconds"], 2),
           "tokens_per_s": round(manifest["tokens"]["total"] / run["seconds"]),
           "tokenizer_tokens_per_s": round(tokenizer_tokens_per_s(out, tokenizer_dir)),
           "tokenizer_one_thread_tokens_per_s": round(tokenizer_tokens_per_s(out, tokenizer_dir, parallel=False)),
           "tokenizer_fast_tokens_per_s": round(tokenizer_tokens_per_s(out, tokenizer_dir, api="fast")),
           "peak_rss_mib": round(run["peak_rss_mib"]), "num_proc": num_proc}
    row["fraction_of_tokenizer"] = round(row["tokens_per_s"] / row["tokenizer_tokens_per_s"], 3)
    row["fraction_of_one_thread"] = round(row["tokens_per_s"] / row["tokenizer_one_thread_tokens_per_s"], 3)
    row["fraction_of_fast"] = round(row["tokens_per_s"] / row["tokenizer_fast_tokens_per_s"], 3)
    return row


def format_row(row: dict[str, Any]) -> str:
    return (f"  {row['command']:<13} {row['input_mb']:>7,.1f} MB  {row['samples']:>7,} samples  "
            f"{row['tokens']:>12,} tokens  {row['seconds']:>7,.1f} s  {row['mb_per_s']:>6.2f} MB/s  "
            f"{row['tokens_per_s']:>9,} tok/s = {row['fraction_of_tokenizer']:.0%} of the tokenizer's "
            f"{row['tokenizer_tokens_per_s']:,} ({row['fraction_of_one_thread']:.0%} of its one-thread "
            f"{row['tokenizer_one_thread_tokens_per_s']:,}; {row['fraction_of_fast']:.0%} of its offset-free "
            f"{row['tokenizer_fast_tokens_per_s']:,})  peak {row['peak_rss_mib']:>5,} MiB")


if __name__ == "__main__":  # the tokenizer baseline's own process: DATASET_DIR TOKENIZER_DIR API
    print(_tokenizer_baseline(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
