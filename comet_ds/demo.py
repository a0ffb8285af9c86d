"""`comet-ds demo`: the whole recipe on a tiny local base, top to bottom.

tiny base → passkey training data → CoMeT + LoRA on 2 pipeline stages under the deepspeed launcher →
reload and export → stream a long sequence → generate → passkey evaluation up to 32x the training length.

Only the standard library and light modules are imported at the top: the command line reads ARCHITECTURES
from here to build its parser, and torch loads once the demo runs.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from comet_ds.configs import example_run_config
from data_prep.fs import claim_directory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from comet_ds.eval.passkey import LengthResult
    from comet_ds.modeling.model import CometForCausalLM

# the demo trains through the pipeline, whose end-to-end checks cover these two families
ARCHITECTURES = ("llama", "qwen3")
EVAL_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def run_demo(out: str | Path, *, overwrite: bool, arch: str, pretrain_steps: int, steps: int, train_tokens: int,
             tokens: int, threads: int) -> None:
    """Run every step of the demo into `out` (new or empty, or with `overwrite` an earlier demo's), printing
    a numbered, timed line per step and at the end where the heatmap, adapter, merged model and MLflow store are."""
    import torch

    out = _claim(out, overwrite)
    torch.set_num_threads(threads)
    step = _Steps()
    with step(f"tiny base model, pretrained {pretrain_steps} steps on the built-in corpus (comet-ds init-base)"):
        base = _build_base(out / "base", arch, pretrain_steps, overwrite)
    with step("passkey training data (comet-prep passkey)"):
        _prepare_passkey_data(base, out / "passkey", train_tokens, overwrite)
    run_config = _write_run_config(out, base, steps)
    with step(f"fine-tune CoMeT + LoRA on 2 pipeline stages (deepspeed launcher, {steps} steps)"):
        _train(run_config)
    with step("reload the trained adapter, export it with LoRA merged"):
        model, tokenizer = _reload_and_export(out / "train" / "adapter", out / "merged", overwrite)
    ids = _corpus_ids(tokenizer, tokens)
    with step(f"stream {len(ids):,} tokens through the trained model"):
        _stream(model, ids)
    with step("generate: continue a held-out passkey prompt with the trained model"):
        _generate(model, tokenizer, train_tokens * 4)
    lengths = [train_tokens * 2**k for k in range(6)]
    with step(f"passkey evaluation from 1x to 32x the training length ({lengths[0]:,} to {lengths[-1]:,} tokens)"):
        results, report = _evaluate(model, tokenizer, lengths, out / "eval")
    _print_summary(out, results, report)


def _claim(out: str | Path, overwrite: bool) -> Path:
    """`out`, made ready: an earlier demo's training run goes too, since a new run refuses to start over its
    checkpoints."""
    out = claim_directory(Path(out).absolute(), "comet-ds demo", overwrite=overwrite)
    if overwrite:
        shutil.rmtree(out / "train", ignore_errors=True)
    return out


def _build_base(out: Path, arch: str, pretrain_steps: int, overwrite: bool) -> Path:
    from comet_ds.modeling.tiny_base import init_base, pretraining_line

    base = init_base(out, arch, pretrain_steps=pretrain_steps, overwrite=overwrite)
    if line := pretraining_line(base):
        print(line)
    return base


def _prepare_passkey_data(base: Path, out: Path, train_tokens: int, overwrite: bool) -> None:
    from data_prep.cli import main as prep

    prep(["passkey", "--tokenizer", str(base), "--lengths", str(train_tokens), "--depths", "5",
          "--samples-per-cell", "8", "--output", str(out), *(["--overwrite"] if overwrite else [])])


def _write_run_config(out: Path, base: Path, steps: int) -> Path:
    """The packaged example run config (the one `comet-ds train --help` shows) with the demo's paths and steps."""
    run_config = yaml.safe_load(example_run_config().read_text(encoding="utf-8"))
    run_config.update(base_model=str(base), dataset=str(out / "passkey"), output_dir=str(out / "train"))
    run_config["train"].update(steps=steps, save_every=steps)
    run_config["tracking"]["experiment"] = "comet_ds-demo"
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(run_config, sort_keys=False))
    return path


def _train(run_config: Path) -> None:
    """`comet-ds train` on 2 pipeline stages, through the deepspeed launcher as a real run would go."""
    from comet_ds.resources import free_port

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--no_local_rank", "--module", "comet_ds.cli", "train", "--config", str(run_config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if subprocess.run(launcher, env=env, check=False).returncode != 0:
        raise SystemExit("comet-ds demo: training failed (its output is above)")


def _reload_and_export(adapter: Path, merged: Path,
                       overwrite: bool) -> tuple[CometForCausalLM, PreTrainedTokenizerBase]:
    from comet_ds.modeling.pretrained import export_merged, load_comet

    model, tokenizer, _ = load_comet(adapter)
    export_merged(adapter, merged, overwrite=overwrite)
    return model, tokenizer


def _corpus_ids(tokenizer: PreTrainedTokenizerBase, tokens: int) -> list[int]:
    """The first `tokens` token ids of the built-in corpus's text."""
    from comet_ds.modeling.tiny_base import synthetic_corpus
    from data_prep.tokens import TextEncoder

    text = " ".join(synthetic_corpus(num_lines=6000, seed=1))
    return TextEncoder(tokenizer).encode(text)[:tokens]


def _stream(model: CometForCausalLM, ids: list[int]) -> None:
    import torch

    from comet_ds.layout import ChunkLayout
    from comet_ds.resources import peak_rss_mib

    layout = ChunkLayout(model.config, model.tokens)
    with torch.inference_mode():
        start = time.perf_counter()
        result = model(layout.iter_chunks([ids]))
        seconds = time.perf_counter() - start
        print(f"    loss {result.loss.item():.4f}, {len(ids) / seconds:,.0f} tokens/s, "
              f"peak RSS {peak_rss_mib():.0f} MiB")


def _generate(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, length: int) -> None:
    """Greedily continue the prompt (the unlabelled tokens) of a new `length`-token passkey sample."""
    from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
    from comet_ds.layout import IGNORE_INDEX
    from data_prep.passkey import passkey_sample
    from data_prep.tokens import TextEncoder

    sample = passkey_sample(TextEncoder(tokenizer), length, 0.5, random.Random(12345))
    prompt = [t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX]
    new = StreamingGenerator(model).generate(prompt, SamplingSettings(max_new_tokens=8))
    print(f"    {len(prompt):,}-token prompt, key {sample.passkey}: generated "
          f"{tokenizer.decode(new, skip_special_tokens=True)!r}")


def _evaluate(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, lengths: list[int],
              out: Path) -> tuple[list[LengthResult], dict[str, str]]:
    from comet_ds.eval.passkey import comet_continuation, evaluate_passkey
    from comet_ds.eval.report import write_passkey_report

    results = evaluate_passkey(comet_continuation(model), tokenizer, lengths, EVAL_DEPTHS, 1, seed=0,
                               progress=lambda line: print("  " + line))
    return results, write_passkey_report(out, results, None, {"lengths": lengths, "model": "demo"})


def _print_summary(out: Path, results: list[LengthResult], report: dict[str, str]) -> None:
    print("\n  length   accuracy   tokens/s   peak MiB")
    for r in results:
        print(f"  {r.length:>7,}   {r.accuracy:>7.0%}   {r.tokens_per_s:>8,.0f}   {r.peak_mem_mib:>8,.0f}")
    print(f"\nheatmap:       {report['heatmap']}")
    print(f"adapter:       {out / 'train' / 'adapter'}")
    print(f"merged model:  {out / 'merged'}")
    print(f"MLflow store:  sqlite:///{out / 'train' / 'mlflow.db'}  (mlflow ui --backend-store-uri ...)")


class _Steps:
    """Numbered progress lines with timings: `with step(title):` prints the title, then the time it took."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, title: str) -> _Steps:
        self.count += 1
        self.title = title
        return self

    def __enter__(self) -> None:
        print(f"[{self.count}] {self.title} ...", flush=True)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            print(f"    done in {time.perf_counter() - self.start:.1f} s", flush=True)
