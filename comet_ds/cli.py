"""`comet-ds`: the command line. Each subcommand's --help explains it with an example."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import warnings
from pathlib import Path

from comet_ds.argtypes import device, dtype
from data_prep.argtypes import (
    depths,
    non_negative_float,
    non_negative_int,
    non_negative_ints,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    probability,
    token_count,
    token_counts,
)

DESCRIPTION = """\
comet_ds turns a pretrained Hugging Face decoder (Llama, Qwen2/Qwen3, Mistral-style) into a CoMeT
memory model that reads arbitrarily long inputs chunk by chunk with constant memory.

Start here:
  comet-ds demo --out runs/demo            tiny base → passkey data → 2-stage pipeline training → stream 32k
  comet-ds train --config RUN.yaml         fine-tune (under the deepspeed launcher; see launch/)
  comet-ds generate --model DIR --prompt TEXT
                                           stream a prompt of any length and continue it
  comet-ds init-base --out runs/base       a tiny local base model + tokenizer (no download)
  comet-ds export --adapter DIR --merge --out DIR2
                                           a standalone model with LoRA merged in
  comet-ds bench forward                   memory and speed of streaming at 4k, 32k and 256k tokens
  comet-ds bench gpu                       CoMeT against full attention at Qwen3 shapes on a GPU
"""


# what `init-base` builds unless told otherwise; `--shipped` takes none of these
INIT_BASE_DEFAULTS = {"arch": "llama", "layers": 4, "hidden_size": 64, "pretrain_steps": 400, "seed": 0}


def cmd_init_base(args: argparse.Namespace) -> None:
    from comet_ds.config import CometInputError
    from comet_ds.modeling.tiny_base import check_buildable, init_base, install_shipped_base, pretraining_line

    if args.shipped:
        if given := [f"--{name.replace('_', '-')}" for name, default in INIT_BASE_DEFAULTS.items()
                     if getattr(args, name) != default]:
            raise CometInputError(f"--shipped writes the base as it was built; drop {', '.join(given)} or --shipped")
        out = install_shipped_base(args.out, overwrite=args.overwrite)
        print(f"wrote the shipped tiny llama base model and tokenizer to {out} (every file's sha256 checked)")
        print(pretraining_line(out))
        return
    check_buildable(args.arch, pretrain=args.pretrain_steps > 0, hidden_size=args.hidden_size, num_layers=args.layers)
    out = init_base(args.out, args.arch, seed=args.seed, pretrain_steps=args.pretrain_steps,
                    overwrite=args.overwrite, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"wrote a tiny {args.arch} base model and tokenizer to {out}")
    if line := pretraining_line(out):
        print(line)


def cmd_export(args: argparse.Namespace) -> None:
    from comet_ds.config import CometInputError
    from comet_ds.modeling.official import export_official
    from comet_ds.modeling.pretrained import export_merged

    if args.format is None and not args.merge:
        raise CometInputError("export writes merged models only: pass --merge (or --format merged|official)")
    export, what = ((export_official, "in the paper's checkpoint layout") if args.format == "official" else
                    (export_merged, "(LoRA merged)"))
    out = export(args.adapter, args.out, base_model=args.base, allow_base_mismatch=args.allow_base_mismatch,
                 overwrite=args.overwrite)
    print(f"wrote a standalone CoMeT model {what} to {out}")


def cmd_import_official(args: argparse.Namespace) -> None:
    from comet_ds.modeling.official import import_official

    out = import_official(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote a comet_ds model directory to {out} (comet-ds generate --model {out} ...)")


class _ResumeMode(argparse.Action):
    """--resume [latest|auto]: an optional value that a KEY=VALUE override right after it is not taken for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: str | None,
                 option: str | None = None) -> None:
        if value is not None and "=" in value:
            namespace.late_overrides = [*getattr(namespace, "late_overrides", []), value]
            value = self.const
        if value not in ("latest", "auto"):
            parser.error(f"argument --resume: invalid choice: {value!r} (choose from latest, auto)")
        setattr(namespace, self.dest, value)


def cmd_train(args: argparse.Namespace) -> None:
    from comet_ds.train.loop import main_from_args

    overrides = [*args.overrides, *getattr(args, "late_overrides", [])]
    main_from_args(args.config, overrides, dry_run=args.dry_run, resume=args.resume)


def _load_for_inference(args: argparse.Namespace):
    """The CoMeT model named by --model/--base on --device in --dtype, and its tokenizer."""
    from comet_ds.modeling.pretrained import load_comet

    model, tokenizer, _ = load_comet(args.model, base_model=args.base, dtype=args.dtype,
                                     allow_base_mismatch=args.allow_base_mismatch)
    return model.to(args.device).eval(), tokenizer


def _add_allow_base_mismatch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="load the adapter onto a base whose weights differ from the ones it was trained on")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="CoMeT model directory")
    p.add_argument("--base", help="base model directory, if it moved since training")
    _add_allow_base_mismatch(p)
    p.add_argument("--device", type=device, default="auto",
                   help="auto (default: a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", type=dtype, default="fp32", help="fp32 (default), bf16 or fp16")


def _read_prompts(path: str) -> list[dict]:
    """The rows of a --prompts JSONL file: JSON objects whose "prompt" is a non-empty string."""
    from comet_ds.config import CometInputError

    file = Path(path)
    if not file.is_file():
        problem = "is a directory" if file.is_dir() else "does not exist"
        raise CometInputError(f'--prompts file {path} {problem}: give a JSONL file, one {{"prompt": ...}} per line')
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CometInputError(f"--prompts file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "prompt" not in row:
            raise CometInputError(f'{path}:{number}: expected a JSON object with a "prompt" field')
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise CometInputError(f'{path}:{number}: "prompt" must be a non-empty string (got {row["prompt"]!r})')
        rows.append(row)
    return rows


def cmd_generate(args: argparse.Namespace) -> None:
    from comet_ds.config import CometInputError
    from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
    from data_prep.fs import check_output_file
    from data_prep.tokens import TextEncoder

    if any(not text for text in args.prompt or []):
        raise CometInputError("--prompt is empty: give the text to continue")
    prompts = [{"prompt": text} for text in args.prompt or []] + (_read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise CometInputError("no prompts: give --prompt TEXT or --prompts FILE.jsonl with at least one line")
    if args.output:
        check_output_file(args.output, "--output", inputs=[args.prompts] if args.prompts else [])
    model, tokenizer = _load_for_inference(args)
    stops = () if args.ignore_eos or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop_token_ids=stops)
    generator, encoder = StreamingGenerator(model), TextEncoder(tokenizer)
    rows = []
    for row in prompts:
        # the prompt is text, framed as the tokenizer frames a text (e.g. bos first)
        new = generator.generate(encoder.encode(row["prompt"], add_special_tokens=True), settings)
        rows.append({**row, "completion": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new)})
        if not args.output:
            print(rows[-1]["completion"], flush=True)
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} completion(s) to {args.output}")


def _claim_eval_directory(args: argparse.Namespace) -> Path:
    """--out of an eval, checked and created before any loading: new, empty or (with --overwrite) this
    eval's own earlier directory, whose files are then replaced; outside the model, base and data."""
    from data_prep.fs import claim_directory

    inputs = [args.model, *filter(None, [args.base, getattr(args, "data", None)])]
    return claim_directory(args.out, f"comet-ds eval {args.eval}", overwrite=args.overwrite, inputs=inputs)


def _check_passkey_lengths(args: argparse.Namespace) -> None:
    """Refuse a --lengths too short to hold a passkey prompt with the model's tokenizer, before the model loads."""
    from transformers import AutoTokenizer

    from comet_ds.config import CometInputError
    from comet_ds.modeling.pretrained import read_meta
    from data_prep.passkey import passkey_sample
    from data_prep.tokens import TextEncoder

    read_meta(args.model)
    encoder = TextEncoder(AutoTokenizer.from_pretrained(args.model))
    try:
        passkey_sample(encoder, min(args.lengths), 0.5, random.Random(0))
    except ValueError as err:
        raise CometInputError(f"--lengths: {err}") from None


def cmd_eval_passkey(args: argparse.Namespace) -> None:
    import torch

    from comet_ds.eval.passkey import (
        comet_continuation,
        evaluate_passkey,
        full_attention_continuation,
        full_attention_fits,
    )
    from comet_ds.eval.report import write_passkey_report
    from comet_ds.modeling.backbone import load_backbone
    from comet_ds.modeling.pretrained import read_meta

    torch.set_num_threads(args.threads)
    out = _claim_eval_directory(args)
    _check_passkey_lengths(args)
    model, tokenizer = _load_for_inference(args)
    depths = args.depths
    print(f"CoMeT passkey: {len(args.lengths)} lengths x {len(depths)} depths x {args.samples} sample(s)")
    comet = evaluate_passkey(comet_continuation(model), tokenizer, args.lengths, depths, args.samples, args.seed,
                             batch_size=args.batch_size)
    baseline = None
    if args.baseline == "full-attention":
        base_dir = args.base or read_meta(args.model)["base_model"] or args.model
        del model
        base = load_backbone(base_dir, args.dtype).to(args.device).eval()
        print(f"full-attention baseline ({base_dir}):")
        baseline = evaluate_passkey(full_attention_continuation(base), tokenizer, args.lengths, depths,
                                    args.samples, args.seed,
                                    skip=lambda n: full_attention_fits(base, n, args.baseline_budget_gib))
    params = {"model": str(args.model), "lengths": args.lengths, "depths": depths, "samples": args.samples,
              "batch_size": args.batch_size, "seed": args.seed, "baseline": args.baseline}
    paths = write_passkey_report(out, comet, baseline, params)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_eval_qa(args: argparse.Namespace) -> None:
    from comet_ds.eval.passkey import comet_continuation
    from comet_ds.eval.qa import check_has_answers, evaluate_qa
    from comet_ds.eval.report import write_qa_report
    from comet_ds.modeling.tokens import inserted_tokens
    from comet_ds.train.data import check_token_ids, load_training_dataset

    out = _claim_eval_directory(args)
    data = load_training_dataset(args.data)
    check_has_answers(data, args.data)
    model, tokenizer = _load_for_inference(args)
    check_token_ids(data, len(tokenizer), inserted_tokens(tokenizer), args.data)  # prompts must be text
    result = evaluate_qa(comet_continuation(model), tokenizer, data, args.max_new_tokens, args.limit)
    paths = write_qa_report(out, result, {"model": str(args.model), "data": str(args.data)})
    print(f"exact match {result['exact_match']:.1%}, token F1 {result['f1']:.1%} over {result['scored']} "
          f"question(s) ({result['skipped']} row(s) without an answer skipped); {paths['json']}")


def _check_bench_arguments(args: argparse.Namespace) -> None:
    """What a benchmark reads and writes, checked before minutes of measuring: --base is a model directory,
    --tokenizer loads, --json can be written."""
    from comet_ds.config import CometInputError
    from data_prep.fs import check_output_file

    if getattr(args, "base", None) and not (Path(args.base) / "config.json").is_file():
        raise CometInputError(f"--base {args.base} is not a base model directory (no config.json); leave it out "
                              "to use a tiny base built in --workdir")
    if getattr(args, "tokenizer", None):
        from data_prep.tokens import open_tokenizer

        open_tokenizer(args.tokenizer)
    if args.json:
        check_output_file(args.json, "--json")


def cmd_bench_forward(args: argparse.Namespace) -> None:
    from comet_ds.bench.forward import BENCH_CONFIG, run_all
    from comet_ds.modeling.tiny_base import init_base

    _check_bench_arguments(args)
    base = args.base
    if base is None:
        base = str(Path(args.workdir) / "tiny-base")
        if not (Path(base) / "config.json").exists():
            init_base(base)
    print(f"streaming forward, fp32, {args.threads} thread(s), base {base}, {BENCH_CONFIG}")
    rows = run_all(base, args.lengths, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if len(rows) >= 2:
        first, last = rows[-2], rows[-1]
        print(f"peak RSS {last['tokens']:,} / {first['tokens']:,}: {last['peak_rss_mib'] / first['peak_rss_mib']:.3f}x;"
              f" tokens/s: {last['tokens_per_s'] / first['tokens_per_s']:.3f}x")


def cmd_bench_prep(args: argparse.Namespace) -> None:
    from comet_ds.bench.prep import bench_one, format_row, generated_inputs
    from comet_ds.modeling.tiny_base import init_base

    _check_bench_arguments(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or str(workdir / "tiny-base")
    if args.tokenizer is None and not (Path(tokenizer) / "tokenizer_config.json").exists():
        init_base(tokenizer, num_layers=1, pretrain_steps=0)  # only its tokenizer is used
    sources = generated_inputs(workdir, args.user_behavior_mb, args.agent_logs_mb)
    print(f"comet-prep, --num-proc {args.num_proc}, tokenizer {tokenizer}")
    rows = []
    for kind, path in sources:
        rows.append(bench_one(kind, path, tokenizer, workdir, args.num_proc))
        print(format_row(rows[-1]), flush=True)
    behavior = [r for r in rows if r["command"] == "user-behavior"]
    if len(behavior) >= 2:
        small, large = behavior[0], behavior[-1]
        print(f"peak RSS {large['input_mb']:g} MB vs {small['input_mb']:g} MB input: "
              f"{large['peak_rss_mib'] / small['peak_rss_mib']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def cmd_bench_pipeline(args: argparse.Namespace) -> None:
    from comet_ds.bench.pipeline import BENCH_CONFIG, run_all
    from comet_ds.modeling.tiny_base import init_base

    _check_bench_arguments(args)
    base = args.base or str(Path(args.workdir) / "tiny-base-4l")
    if args.base is None and not (Path(base) / "config.json").exists():
        init_base(base, num_layers=4)
    print(f"pipeline training, fp32, base {base}, {BENCH_CONFIG}")
    result = run_all(base, args.tokens, args.memory_lengths, args.bptt_window, args.steps, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from comet_ds.bench.gpu import BenchSettings, run_bench
    from data_prep.fs import claim_directory

    settings = BenchSettings(
        shape=args.shape, layers=args.layers, lengths=tuple(args.lengths), decode_tokens=args.decode_tokens,
        train_full=args.train_full, train_windowed=args.train_windowed, bptt_window=args.bptt_window,
        baseline_train_lengths=tuple(args.baseline_train_lengths), training=not args.no_training,
        budget_s=args.budget_s, device=args.device, dtype=str(args.dtype).removeprefix("torch."), repeats=args.repeats)
    out = claim_directory(args.out, "comet-ds bench gpu", overwrite=args.overwrite)
    print(f"comet-ds bench gpu: {settings.shape} on {settings.device} in {settings.dtype}, "
          f"{settings.budget_s:.0f} s budget, writing {out}")
    summary = run_bench(settings, out)["summary"]
    print(json.dumps(summary, indent=2))


def cmd_bench_schedule(args: argparse.Namespace) -> None:
    from comet_ds.bench.schedule import Costs, calibrate, compare, format_rows
    from comet_ds.modeling.tiny_base import init_base

    _check_bench_arguments(args)
    rows = []
    for stages in args.stages:
        costs = Costs(1.0, args.backward_cost, args.send_cost)
        if args.calibrate:
            base = args.base or str(Path(args.workdir) / "tiny-base-4l")
            if args.base is None and not (Path(base) / "config.json").exists():
                init_base(base, num_layers=4)
            costs = calibrate(base, stages)
            print(f"calibrated on {base}: per stage of {stages}, forward {costs.forward * 1e3:.1f} ms, backward "
                  f"{costs.backward * 1e3:.1f} ms per chunk (backward/forward {costs.backward / costs.forward:.2f})")
        for chunks in args.chunks:
            for window in args.window:
                found = compare(stages, chunks, window or None, args.accumulation, costs)
                print(f"{stages} stages, {args.accumulation} x {chunks} chunks, window {window or 'none'}:")
                print(format_rows(found), flush=True)
                rows += found
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def cmd_demo(args: argparse.Namespace) -> None:
    from comet_ds.config import CometInputError
    from comet_ds.demo import run_demo

    if args.pretrain_steps is None and args.arch != "llama":
        raise CometInputError(f"the shipped tiny base is a llama: give --pretrain-steps to build a {args.arch} one "
                              "(copying a key back in context takes about 2,500 steps)")
    run_demo(args.out, overwrite=args.overwrite, arch=args.arch, pretrain_steps=args.pretrain_steps, scale=args.scale,
             seed=args.seed, tokens=args.tokens, eval_samples=args.eval_samples, eval_up_to=args.eval_up_to,
             threads=args.threads, train_threads=args.train_threads)


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"{what}; any other non-empty --out is refused")


def build_parser() -> argparse.ArgumentParser:
    from comet_ds import __version__, demo
    from comet_ds.configs import example_run_config, packaged_deepspeed_configs
    from comet_ds.modeling import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="comet-ds", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"comet_ds {__version__}")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-base", help="write a tiny Llama/Qwen3 base model and tokenizer (no download)",
                       description="Train a sentencepiece tokenizer on a built-in synthetic corpus, pretrain a "
                                   "tiny decoder on the same corpus (next-token prediction, a minute or two on a "
                                   "CPU) and write both in save_pretrained format.\n\n"
                                   "In-context copying (what passkey retrieval builds on) appears after about "
                                   "3,500 steps; the default is a short run that makes a working LM.\n\n"
                                   "example: comet-ds init-base --out runs/base --arch qwen3 --pretrain-steps 4000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write: new or empty; it appears once complete")
    _add_overwrite(p, "replace --out if it holds an earlier comet-ds init-base output")
    p.add_argument("--arch", choices=ARCHITECTURES, help="decoder family (default: %(default)s)")
    p.add_argument("--layers", type=positive_int, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden-size", type=positive_int, help="hidden size (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=non_negative_int,
                   help="pretraining steps of 16 x 256 tokens; 0 leaves the weights random (default: %(default)s)")
    p.add_argument("--seed", type=int, help="(default: %(default)s)")
    p.add_argument("--shipped", action="store_true",
                   help="write the pretrained base shipped with the package instead of building one: llama, "
                        "4 layers, hidden 64, built by `comet-ds init-base --pretrain-steps 2500` (it copies "
                        "a key back in context); the size and training options do not apply")
    p.set_defaults(func=cmd_init_base, **INIT_BASE_DEFAULTS)

    p = sub.add_parser("export", help="write a standalone model with the LoRA adapters merged in",
                       description="Merge a CoMeT adapter directory (LoRA + memory networks + new token rows) "
                                   "into its base model and write one directory that loads on its own.\n\n"
                                   "--format official writes the layout of the CoMeT paper's code instead "
                                   "(Qwen3 models: inner_layer / global_memory_net / temp_memory_net weights, the "
                                   "CoMeT fields in config.json, vocabulary padded to a multiple of 256).\n\n"
                                   "examples:\n  comet-ds export --adapter runs/demo/adapter --merge --out runs/merged"
                                   "\n  comet-ds export --adapter RUN/adapter --format official --out runs/official",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="CoMeT model directory (a checkpoint's adapter directory)")
    p.add_argument("--out", required=True, help="directory to write: new or empty; it appears once complete")
    _add_overwrite(p, "replace --out if it holds an earlier output of the same export")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights (= --format merged)")
    p.add_argument("--format", choices=("merged", "official"),
                   help="merged: a comet_ds model directory; official: the paper's checkpoint layout")
    p.add_argument("--base", help="base model directory, if it moved since training")
    _add_allow_base_mismatch(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-official", help="read a checkpoint of the CoMeT paper's code",
                       description="Write a checkpoint saved by the CoMeT paper's code (a Qwen3 directory with "
                                   "chunk_size, placeholder_id, temp_beacon_id, temp_beacon_stride, temp_mem_budget "
                                   "and global_beacon_ids in config.json, safetensors weights) as a comet_ds model "
                                   "directory: generate, eval and init_from take it as it is, every token id keeps "
                                   "its meaning. Pickled weights (pytorch_model.bin) are refused.\n\n"
                                   "example: comet-ds import-official --checkpoint ckpt/comet-qwen3-4b --out "
                                   "runs/imported",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the directory the paper's code saved")
    p.add_argument("--out", required=True, help="directory to write: new or empty; it appears once complete")
    _add_overwrite(p, "replace --out if it holds an earlier comet-ds import-official output")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("train", help="fine-tune on DeepSpeed pipeline stages (run it under the deepspeed launcher)",
                       description="Train a CoMeT model from a run config (YAML). Pipeline stages come from the "
                                   "DeepSpeed config it names (pipeline.stages); the remaining processes form "
                                   "data-parallel replicas.\n\ndeepspeed_config in the run config: the path of a "
                                   "DeepSpeed .json file, or the name of a packaged one:\n  "
                                   f"{', '.join(packaged_deepspeed_configs())}\n\nexamples:\n"
                                   f"  comet-ds train --config {example_run_config()} --dry-run\n"
                                   "  deepspeed --num_gpus 2 --module comet_ds.cli train --config RUN.yaml "
                                   "train.steps=50\n  launch/single_node.sh --procs 2 --config RUN.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, partition and memory "
                                                         "estimate, then exit")
    p.add_argument("--resume", nargs="?", const="latest", action=_ResumeMode, metavar="{latest,auto}",
                   help="continue from the newest checkpoint in output_dir, which must verify against its "
                        "manifest; --resume auto: from the newest one that verifies")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate from a CoMeT model, streaming prompts of any length",
                       description="Load a CoMeT model directory (a checkpoint's adapter, a training run's "
                                   "adapter/ or an export) and continue prompts. Prompts stream chunk by chunk "
                                   "with the memories; only the current chunk is cached, and generation rolls "
                                   "over into new chunks without a length limit.\n\nexamples:\n"
                                   "  comet-ds generate --model runs/demo/train/adapter --prompt 'The pass key is'\n"
                                   "  comet-ds generate --model DIR --prompts prompts.jsonl --output out.jsonl "
                                   "--sample --top-p 0.9",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help='JSONL file, one {"prompt": ...} object per line (other fields are kept)')
    p.add_argument("--output", help="write JSONL results here instead of printing completions")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, > 0 (default: 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="sample from the k likeliest tokens; 0: from all (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="long-context evaluation: passkey retrieval, QA scoring")
    evals = p.add_subparsers(dest="eval", metavar="EVAL", required=True)
    p = evals.add_parser("passkey", help="passkey accuracy by length and depth, with speed and memory",
                         description="Hide a 5-digit pass key at each depth of filler text of each length and ask "
                                     "for it back. Writes passkey.json, a heatmap PNG and an MLflow run; with "
                                     "--baseline full-attention also the plain base model, as far as it fits, and "
                                     "a plot of memory and time against length for both.\n\n"
                                     "example: comet-ds eval passkey --model runs/demo/train/adapter "
                                     "--lengths 1k,4k,32k --depths 5 --baseline full-attention --out runs/eval",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(p)
    p.add_argument("--lengths", default="1k,4k,16k", type=token_counts,
                   help="comma-separated context lengths (default: 1k,4k,16k)")
    p.add_argument("--depths", default="5", type=depths,
                   help="a number of evenly spaced depths, or fractions like 0.1,0.5 (default: 5)")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per (length, depth) (default: 1)")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="CoMeT prompts read together: on a small model or many cores several are about as fast as "
                        "one (20 at once read the demo model's 32k-token prompts 2-3x as fast on 2 cores); peak "
                        "memory grows with it (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", choices=["none", "full-attention"], default="none")
    p.add_argument("--baseline-budget-gib", type=positive_float, default=8.0,
                   help="skip full-attention lengths whose attention scores would exceed this (default: 8)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default="runs/eval", help="output directory, new or empty (default: runs/eval)")
    _add_overwrite(p, "write into --out if an earlier comet-ds eval passkey wrote there, replacing its files")
    p.set_defaults(func=cmd_eval_passkey)
    p = evals.add_parser("qa", help="exact match and token F1 on a comet-prep dataset",
                         description="Continue each row's prompt (the tokens before its labelled answer) and "
                                     "score the continuation against the answer.\n\n"
                                     "example: comet-ds eval qa --model DIR --data runs/agent_qa --out runs/eval_qa",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(p)
    p.add_argument("--data", required=True, help="a comet-prep output directory")
    p.add_argument("--max-new-tokens", type=positive_int, help="default: the answer's length + 4")
    p.add_argument("--limit", type=positive_int, help="score at most this many questions")
    p.add_argument("--out", default="runs/eval_qa", help="output directory, new or empty (default: runs/eval_qa)")
    _add_overwrite(p, "write into --out if an earlier comet-ds eval qa wrote there, replacing its files")
    p.set_defaults(func=cmd_eval_qa)

    p = sub.add_parser("bench", help="benchmarks (results belong in docs/BENCHMARKS.md)")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bench.add_parser("forward", help="streaming forward: peak RSS and tokens/s against length",
                         description="Stream random token sequences through a CoMeT model on the tiny base, one "
                                     "fresh process per length, and report peak RSS and tokens/s.\n\n"
                                     "example: comet-ds bench forward --lengths 4k,32k,256k",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4k,32k,256k", type=token_counts,
                   help="comma-separated sequence lengths (default: 4k,32k,256k)")
    p.add_argument("--base", help="base model directory (default: a tiny base built in --workdir)")
    p.add_argument("--workdir", default="runs/bench", help="where the tiny base is built (default: runs/bench)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", help="also write the result rows to this JSON file")
    p.set_defaults(func=cmd_bench_forward)

    p = bench.add_parser("pipeline", help="pipeline training: stage overlap and memory against length",
                         description="Time real 2-stage pipeline training steps against 1 stage on the same "
                                     "sequence (as a fraction of the ideal T*S/(T+S-1)), and measure peak RSS per "
                                     "stage for long training sequences, all with one BPTT window.\n\n"
                                     "example: comet-ds bench pipeline --memory-lengths 32k,1m",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=token_count, default=16384, help="sequence for the throughput runs (default: 16k)")
    p.add_argument("--memory-lengths", default="32k,1m", type=token_counts,
                   help="training sequence lengths for the memory runs (default: 32k,1m)")
    p.add_argument("--bptt-window", type=positive_int, default=8, help="BPTT window of every run (default: 8)")
    p.add_argument("--steps", type=positive_int, default=2, help="timed steps per throughput run (default: 2)")
    p.add_argument("--repeats", type=positive_int, default=2, help="interleaved rounds of throughput runs (default: 2)")
    p.add_argument("--base", help="base model directory (default: a 4-layer tiny base built in --workdir)")
    p.add_argument("--workdir", default="runs/bench", help="where the tiny base is built (default: runs/bench)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench_pipeline)

    p = bench.add_parser("schedule", help="pipeline schedule replay: makespan, bubble and buffers, before vs now",
                         description="Replay the instruction streams the pipeline engine runs on every stage, with "
                                     "blocking send/recv and a cost per instruction, for the draining schedule "
                                     "(before) and the 1F1B-over-blocks one (now): the step's makespan, the ideal "
                                     "(the busiest stage's own work), the bubble fraction, the one-fill-one-drain "
                                     "bound (S-1)/(M+S-1) for M micro-batches, and peak live activation buffers per "
                                     "stage. A deadlock is an error.\n\nexample: comet-ds bench schedule --stages "
                                     "2,4,8,16 --chunks 64,512 --window 4,8,16",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=positive_ints, required=True, help="pipeline stages (comma-separated list)")
    p.add_argument("--chunks", type=positive_ints, required=True, help="chunks per sequence (comma-separated list)")
    p.add_argument("--window", type=non_negative_ints, default=[0],
                   help="BPTT window in chunks (comma-separated list; 0: none, the default)")
    p.add_argument("--accumulation", type=positive_int, default=1, help="sequence groups per step (default: 1)")
    p.add_argument("--backward-cost", type=positive_float, default=2.0,
                   help="a chunk's backward per stage, in forwards (default: 2)")
    p.add_argument("--send-cost", type=non_negative_float, default=0.0,
                   help="one activation or gradient transfer, in forwards (default: 0)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure one chunk's forward and backward of the bench model here instead of the costs above")
    p.add_argument("--base", help="base model for --calibrate (default: a 4-layer tiny base built in --workdir)")
    p.add_argument("--workdir", default="runs/bench", help="where the tiny base is built (default: runs/bench)")
    p.add_argument("--json", help="also write the result rows to this JSON file")
    p.set_defaults(func=cmd_bench_schedule)

    p = bench.add_parser("prep", help="comet-prep throughput and memory on generated logs",
                         description="Generate a Taobao-layout user-behaviour CSV at each size and an agent-log "
                                     "JSONL, run comet-prep on each in a fresh process, and report MB/s, tokens/s "
                                     "(also as a fraction of the tokenizer's own batch speed on the same text) and "
                                     "peak RSS.\n\nexample: comet-ds bench prep --user-behavior-mb 50,200 "
                                     "--agent-logs-mb 50",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--user-behavior-mb", type=positive_floats, default=[50.0, 200.0],
                   help="sizes of the generated CSVs in MB (default: 50,200)")
    p.add_argument("--agent-logs-mb", type=non_negative_float, default=50.0,
                   help="size of the agent-log JSONL (default: 50; 0 skips it)")
    p.add_argument("--num-proc", type=positive_int, default=1, help="comet-prep --num-proc (default: 1)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: a tiny base's, built in --workdir)")
    p.add_argument("--workdir", default="runs/bench-prep", help="inputs and outputs (default: runs/bench-prep)")
    p.add_argument("--json", help="also write the result rows to this JSON file")
    p.set_defaults(func=cmd_bench_prep)

    p = bench.add_parser("gpu", help="CoMeT vs full attention at Qwen3 shapes: prefill, decode, training, kernels",
                         description="Build a Qwen3-shaped base with random weights on the device (nothing is "
                                     "downloaded) and measure, within --budget-s: which sdpa kernel the chunk's "
                                     "attention runs (and its time under each mask formulation); streaming prefill "
                                     "tokens/s and peak memory at each length against Hugging Face full attention "
                                     "until it runs out of memory; decode latency after the longest prefill; one "
                                     "LoRA training step with activation checkpointing (full backprop, then a BPTT "
                                     "window) against full-attention LoRA with gradient checkpointing. Writes "
                                     "results.json, prefill.png and training.png into --out. Needs no DeepSpeed."
                                     "\n\nexample (GPU): comet-ds bench gpu --shape qwen3-0.6b --out runs/bench-gpu"
                                     "\nexample (CPU, seconds): comet-ds bench gpu --shape tiny --lengths 256,1k "
                                     "--train-full 256 --train-windowed 1k --baseline-train-lengths 128,256 "
                                     "--out runs/bench-gpu-tiny",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["qwen3-0.6b", "qwen3-4b", "tiny"], default="qwen3-0.6b",
                   help="model shape; the real ones use C=2048, G=512, s=8, Q=2048 (default: qwen3-0.6b)")
    p.add_argument("--layers", type=positive_int,
                   help="decoder layers, fewer than the shape's to see its kernels and per-layer costs quickly")
    p.add_argument("--lengths", type=token_counts, default=[32_768, 131_072, 524_288, 1_048_576],
                   help="prefill lengths (default: 32k,128k,512k,1m)")
    p.add_argument("--decode-tokens", type=positive_int, default=32,
                   help="tokens decoded after the longest prefill (default: 32)")
    p.add_argument("--train-full", type=token_count, default=32_768,
                   help="training length with full backprop through the memories (default: 32k)")
    p.add_argument("--train-windowed", type=token_count, default=131_072,
                   help="training length with --bptt-window chunks per backward (default: 128k)")
    p.add_argument("--bptt-window", type=positive_int, default=8, help="chunks per backward (default: 8)")
    p.add_argument("--baseline-train-lengths", type=token_counts, default=[4096, 32_768],
                   help="full-attention training lengths (default: 4k,32k)")
    p.add_argument("--no-training", action="store_true", help="measure kernels, prefill and decode only")
    p.add_argument("--budget-s", type=positive_float, default=540.0,
                   help="seconds to measure in; a run predicted to overrun them is skipped and said so (default: 540)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls of the attention alone (default: 5)")
    p.add_argument("--device", type=device, default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", type=dtype, default="bf16", help="bf16 (default), fp32 or fp16")
    p.add_argument("--out", default="runs/bench-gpu", help="output directory, new or empty (default: runs/bench-gpu)")
    _add_overwrite(p, "write into --out if an earlier comet-ds bench gpu wrote there, replacing its files")
    p.set_defaults(func=cmd_bench_gpu)

    p = sub.add_parser("demo", help="the end-to-end demo on a tiny local base (CPU, minutes)",
                       description="Start from the tiny base shipped with the package and train the staged "
                                   "passkey recipe (comet_ds/configs/run/passkey_recipe.yaml): for each stage, "
                                   "passkey data from comet-prep, then CoMeT + LoRA on 2 DeepSpeed pipeline stages "
                                   "through the deepspeed launcher with MLflow tracking. Then reload and export the "
                                   "adapter, stream a long sequence in constant memory, generate, and evaluate "
                                   "passkey retrieval from 1x to 32x the training length.\n\n"
                                   "example: comet-ds demo --out runs/demo\n"
                                   "         comet-ds demo --out runs/demo-s1 --seed 1   (another seed, same recipe)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory, new or empty (default: runs/demo)")
    _add_overwrite(p, "start over in --out if an earlier demo wrote it, replacing everything that demo wrote")
    p.add_argument("--arch", choices=demo.ARCHITECTURES, default="llama")
    p.add_argument("--pretrain-steps", type=non_negative_int,
                   help="build the tiny base here, pretrained this many steps, instead of using the shipped one "
                        "(which --arch llama uses by default; other architectures need this)")
    p.add_argument("--scale", type=positive_float, default=1.0,
                   help="multiplies every recipe stage's steps (default: 1; comet_ds/configs/run/passkey_recipe.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data and the training run (default: 0)")
    p.add_argument("--eval-samples", type=positive_int, default=4,
                   help="passkey samples per depth and length in the evaluation (default: 4)")
    p.add_argument("--eval-up-to", type=positive_int, default=32, metavar="X",
                   help="evaluate at 1x, 2x, 4x, ... up to X times the training length (default: 32)")
    p.add_argument("--tokens", type=positive_int, default=32768,
                   help="tokens to stream after training (default: 32768)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads outside training (default: 2)")
    p.add_argument("--train-threads", type=positive_int, default=1,
                   help="torch threads of each of the 2 training processes (default: 1; 2 cores run them best)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from comet_ds.config import CometInputError
    from data_prep.fs import sigterm_unwinds

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from dependencies
    # training leaves signals to the deepspeed launcher, which stops every rank
    unwinds = contextlib.nullcontext() if args.command == "train" else sigterm_unwinds()
    try:
        with unwinds:
            args.func(args)
    # bad input: CometInputError; paths that cannot be read or written (missing, a directory, no permission): OSError
    except (CometInputError, OSError, UnicodeDecodeError) as err:
        print(f"comet-ds: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.command == "train":
            raise
        print(f"comet-ds {args.command}: interrupted; no scratch directory left behind", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
