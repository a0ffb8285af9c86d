"""`comet-ds demo`: the whole recipe on a tiny local base, top to bottom.

the shipped tiny base → for each stage of the passkey recipe: training data, then CoMeT + LoRA on 2 pipeline
stages under the deepspeed launcher → reload and export → stream a long sequence → generate → passkey
evaluation up to 32x the training length.

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

from comet_ds.configs import passkey_recipe
from data_prep.argtypes import token_counts
from data_prep.fs import claim_directory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from comet_ds.eval.passkey import LengthResult
    from comet_ds.modeling.model import CometForCausalLM

# the demo trains through the pipeline, whose end-to-end checks cover these two families
ARCHITECTURES = ("llama", "qwen3")
EVAL_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
# the evaluation's keys and the generated prompt's, the same for every demo run; training data holds them out
EVAL_SEED = 0
GENERATE_SEED = 12345


def run_demo(out: str | Path, *, overwrite: bool, arch: str, pretrain_steps: int | None, scale: float, seed: int,
             tokens: int, eval_samples: int, eval_up_to: int, threads: int, train_threads: int) -> None:
    """Run every step of the demo into `out` (new or empty, or with `overwrite` an earlier demo's), printing
    a numbered, timed line per step and at the end where the heatmap, adapter, merged model and MLflow store are."""
    import torch

    out = _claim(out, overwrite)
    torch.set_num_threads(threads)
    recipe = yaml.safe_load(passkey_recipe().read_text(encoding="utf-8"))
    train_tokens = max(token_counts(str(recipe["stages"][-1]["lengths"])))
    lengths = [train_tokens * 2**k for k in range(eval_up_to.bit_length())]
    held_out = _hold_out(out / "data", lengths, eval_samples)
    step = _Steps()
    with step(_base_title(arch, pretrain_steps)):
        base = _build_base(out / "base", arch, pretrain_steps, overwrite)
    adapter = None
    for index, stage in enumerate(recipe["stages"]):
        steps = max(2, round(stage["steps"] * scale))
        with step(f"stage {stage['name']}: {steps} steps of {stage['lengths']}-token passkey samples, key depths "
                  f"{stage['depths']} (comet-prep passkey, then comet-ds train on 2 pipeline stages)"):
            # every stage of every seed draws samples (and keys) of its own
            run_config = _write_stage(out, base, recipe["run"], stage, steps, seed, seed * 100 + index, adapter,
                                      held_out, overwrite)
            _train(run_config, train_threads)
        adapter = out / "stages" / stage["name"] / "adapter"
    curve = _plot_training(out, [stage["name"] for stage in recipe["stages"]], seed)
    with step("reload the trained adapter, export it with LoRA merged"):
        model, tokenizer = _reload_and_export(adapter, out / "merged", overwrite)
    ids = _corpus_ids(tokenizer, tokens)
    with step(f"stream {len(ids):,} tokens through the trained model"):
        _stream(model, ids)
    with step("generate: continue a held-out passkey prompt with the trained model"):
        _generate(model, tokenizer, train_tokens * 4)
    with step(f"passkey evaluation from 1x to {lengths[-1] // train_tokens}x the training length "
              f"({lengths[0]:,} to {lengths[-1]:,} tokens, {len(EVAL_DEPTHS)} depths x {eval_samples} samples)"):
        results, report = _evaluate(model, tokenizer, lengths, eval_samples, out / "eval")
    _print_summary(out, adapter, curve, results, report)


def _claim(out: str | Path, overwrite: bool) -> Path:
    """`out`, made ready: an earlier demo's training runs and their tracking go too, since a new run refuses to
    start over its checkpoints."""
    out = claim_directory(Path(out).absolute(), "comet-ds demo", overwrite=overwrite)
    if overwrite:
        shutil.rmtree(out / "stages", ignore_errors=True)
        (out / "mlflow.db").unlink(missing_ok=True)
    return out


def _base_title(arch: str, pretrain_steps: int | None) -> str:
    if pretrain_steps is None:
        return "tiny base model: the pretrained one shipped with the package (comet-ds init-base --shipped)"
    return f"tiny {arch} base model, pretrained {pretrain_steps} steps on the built-in corpus (comet-ds init-base)"


def _build_base(out: Path, arch: str, pretrain_steps: int | None, overwrite: bool) -> Path:
    from comet_ds.modeling.tiny_base import init_base, install_shipped_base, pretraining_line

    if pretrain_steps is None:
        base = install_shipped_base(out, overwrite=overwrite)
    else:
        base = init_base(out, arch, pretrain_steps=pretrain_steps, overwrite=overwrite)
    if line := pretraining_line(base):
        print(line)
    return base


def _hold_out(folder: Path, lengths: list[int], samples: int) -> Path:
    """A file of the evaluation's keys, which the training data then never uses."""
    from comet_ds.eval.passkey import evaluation_keys
    from data_prep.passkey import PASSKEY_RANGE, draw_key

    keys = [*evaluation_keys(lengths, EVAL_DEPTHS, samples, seed=EVAL_SEED),
            draw_key(random.Random(GENERATE_SEED), *PASSKEY_RANGE)]  # the generation step's prompt
    folder.mkdir(exist_ok=True)
    path = folder / "held_out_keys.txt"
    path.write_text("\n".join(keys) + "\n")
    return path


def _write_stage(out: Path, base: Path, run: dict, stage: dict, steps: int, seed: int, data_seed: int,
                 init_from: Path | None, held_out: Path, overwrite: bool) -> Path:
    """The stage's passkey data (enough distinct samples for every step, none with a held-out key) and its run
    config: the recipe's shared settings with this stage's paths, steps and seeds; returns the run config's path."""
    from data_prep.cli import main as prep

    config = stage_run_config(out, base, run, stage, steps, seed, init_from)
    cells = len(str(stage["lengths"]).split(",")) * len(str(stage["depths"]).split(","))
    samples = steps * run["train"]["sequences_per_step"]
    prep(["passkey", "--tokenizer", str(base), "--lengths", str(stage["lengths"]), "--depths", str(stage["depths"]),
          "--samples-per-cell", str(-(-samples // cells)), "--seed", str(data_seed), "--hold-out-keys", str(held_out),
          "--quiet", "--output", config["dataset"],
          *(["--overwrite"] if overwrite else [])])
    path = out / "stages" / f"{stage['name']}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stage_run_config(out: Path, base: Path, run: dict, stage: dict, steps: int, seed: int,
                     init_from: Path | None) -> dict:
    """One stage's run config: the recipe's shared settings, the stage's own `train` settings over them, and
    the stage's paths, steps and seed."""
    name = stage["name"]
    config = {**run, "base_model": str(base), "dataset": str(out / "data" / name),
              "output_dir": str(out / "stages" / name),
              "train": {**run["train"], **stage.get("train", {}), "steps": steps, "save_every": steps, "seed": seed},
              "tracking": {**run["tracking"], "tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "run_name": name}}
    if init_from is not None:
        config["init_from"] = str(init_from)
    return config


def _plot_training(out: Path, stages: list[str], seed: int) -> Path:
    from comet_ds.eval.report import loss_curves

    path = out / "training_loss.png"
    loss_curves({f"seed {seed}": [out / "stages" / name / "metrics.jsonl" for name in stages]}, path,
                f"passkey recipe, stages {' → '.join(stages)}")
    return path


def _train(run_config: Path, threads: int) -> None:
    """`comet-ds train` on 2 pipeline stages, `threads` torch threads each, through the deepspeed launcher as a
    real run would go."""
    from comet_ds.resources import free_port

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--no_local_rank", "--module", "comet_ds.cli", "train", "--config", str(run_config)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
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

    sample = passkey_sample(TextEncoder(tokenizer), length, 0.5, random.Random(GENERATE_SEED))
    prompt = [t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX]
    new = StreamingGenerator(model).generate(prompt, SamplingSettings(max_new_tokens=8))
    print(f"    {len(prompt):,}-token prompt, key {sample.passkey}: generated "
          f"{tokenizer.decode(new, skip_special_tokens=True)!r}")


def _evaluate(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, lengths: list[int], samples: int,
              out: Path) -> tuple[list[LengthResult], dict[str, str]]:
    from comet_ds.eval.passkey import comet_continuation, evaluate_passkey
    from comet_ds.eval.report import write_passkey_report

    # all of a length's prompts in one batch: on the tiny model 2-3x the tokens/s of one by one (BENCHMARKS)
    results = evaluate_passkey(comet_continuation(model), tokenizer, lengths, EVAL_DEPTHS, samples, seed=EVAL_SEED,
                               progress=lambda line: print("  " + line), batch_size=len(EVAL_DEPTHS) * samples)
    return results, write_passkey_report(out, results, None, {"lengths": lengths, "model": "demo"})


def _print_summary(out: Path, adapter: Path, curve: Path, results: list[LengthResult],
                   report: dict[str, str]) -> None:
    print("\n  length   accuracy   tokens/s   peak MiB")
    for r in results:
        print(f"  {r.length:>7,}   {r.accuracy:>7.0%}   {r.tokens_per_s:>8,.0f}   {r.peak_mem_mib:>8,.0f}")
    print(f"\nheatmap:       {report['heatmap']}")
    print(f"training loss: {curve}")
    print(f"adapter:       {adapter}")
    print(f"merged model:  {out / 'merged'}")
    print(f"MLflow store:  sqlite:///{out / 'mlflow.db'}  (mlflow ui --backend-store-uri ...)")


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
