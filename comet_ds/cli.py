"""`comet-ds`: the command line. Each subcommand's --help explains it with an example."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DESCRIPTION = """\
comet_ds turns a pretrained Hugging Face decoder (Llama, Qwen2/Qwen3, Mistral-style) into a CoMeT
memory model that reads arbitrarily long inputs chunk by chunk with constant memory.

Start here:
  comet-ds demo --out runs/demo            build a tiny base, wrap it with CoMeT, stream 32k tokens
  comet-ds init-base --out runs/base       a tiny local base model + tokenizer (no download)
  comet-ds export --adapter DIR --merge --out DIR2
                                           a standalone model with LoRA merged in
  comet-ds bench forward                   memory and speed of streaming at 4k, 32k and 256k tokens
"""


def cmd_init_base(args: argparse.Namespace) -> None:
    from comet_ds.modeling.tiny_base import init_base

    out = init_base(args.out, args.arch, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"wrote a tiny {args.arch} base model and tokenizer to {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from comet_ds.modeling.pretrained import export_merged

    if not args.merge:
        raise SystemExit("comet-ds export: only --merge exports exist: pass --merge to write a standalone model")
    out = export_merged(args.adapter, args.out, base_model=args.base)
    print(f"wrote a standalone CoMeT model (LoRA merged) to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from comet_ds.train.loop import main_from_args

    main_from_args(args.config, args.overrides, dry_run=args.dry_run, resume=args.resume)


def cmd_bench_forward(args: argparse.Namespace) -> None:
    from comet_ds.bench.forward import BENCH_CONFIG, run_all
    from comet_ds.modeling.tiny_base import init_base

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


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from comet_ds.config import CometConfig
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.finetune import FinetuneSettings, parameter_counts
    from comet_ds.modeling.pretrained import build_comet, export_merged, load_comet, save_comet
    from comet_ds.modeling.tiny_base import init_base, synthetic_corpus
    from comet_ds.resources import peak_rss_mib

    out = Path(args.out)
    torch.set_num_threads(args.threads)
    step = _Steps()
    with step("tiny base model (init-base)"):
        base = init_base(out / "base", args.arch)
    config = CometConfig(chunk_size=128, global_slots=8, temp_stride=8, temp_budget=64)
    with step(f"CoMeT + LoRA on the base ({config})"):
        model, tokenizer = build_comet(base, config, FinetuneSettings())
        counts = parameter_counts(model)
        print(f"    {counts['trainable']:,} trainable of {counts['total']:,} parameters "
              f"({counts['memory']:,} in memory networks)")
    text = " ".join(synthetic_corpus(num_lines=6000, seed=1))
    ids = tokenizer(text, add_special_tokens=False).input_ids[: args.tokens]
    layout = ChunkLayout(config, model.tokens)
    with step(f"layer-major reference vs chunk-major streaming on {len(ids[:2048]):,} tokens"), torch.no_grad():
        short = layout.layout([ids[:2048]])
        ref, stream = model.forward_reference(short), model(short)
        print(f"    loss {ref.loss.item():.6f} vs {stream.loss.item():.6f} "
              f"(|diff| {abs(ref.loss.item() - stream.loss.item()):.1e})")
    with step("save adapter directory, reload, export with LoRA merged"):
        adapter = save_comet(model, tokenizer, out / "adapter", FinetuneSettings(), str(base))
        export_merged(adapter, out / "merged")
        reloaded, _, _ = load_comet(out / "merged")
    with step(f"streaming {len(ids):,} tokens in {layout.num_chunks(len(ids))} chunks"), torch.inference_mode():
        start = time.perf_counter()
        result = reloaded(layout.iter_chunks([ids]))
        seconds = time.perf_counter() - start
        print(f"    loss {result.loss.item():.4f}, {len(ids) / seconds:,.0f} tokens/s, "
              f"peak RSS {peak_rss_mib():.0f} MiB")
    print("\npipeline training on DeepSpeed and passkey evaluation: not yet available in this version")
    print(f"outputs: {out.absolute()}")


class _Steps:
    """Numbered progress lines with timings for the demo."""

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


def build_parser() -> argparse.ArgumentParser:
    from comet_ds import __version__

    parser = argparse.ArgumentParser(prog="comet-ds", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"comet_ds {__version__}")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-base", help="write a tiny Llama/Qwen3 base model and tokenizer (no download)",
                       description="Train a sentencepiece tokenizer on a built-in synthetic corpus and write a "
                                   "randomly initialised tiny decoder with it, in save_pretrained format.\n\n"
                                   "example: comet-ds init-base --out runs/base --arch qwen3",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--arch", choices=["llama", "qwen3", "qwen2", "mistral"], default="llama",
                   help="decoder family (default: llama)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--hidden-size", type=int, default=64, help="hidden size (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_base)

    p = sub.add_parser("export", help="write a standalone model with the LoRA adapters merged in",
                       description="Merge a CoMeT adapter directory (LoRA + memory networks + new token rows) "
                                   "into its base model and write one directory that loads on its own.\n\n"
                                   "example: comet-ds export --adapter runs/demo/adapter --merge --out runs/merged",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="CoMeT model directory (a checkpoint's adapter directory)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights (required)")
    p.add_argument("--base", help="base model directory, if it moved since training")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="fine-tune on DeepSpeed pipeline stages (run it under the deepspeed launcher)",
                       description="Train a CoMeT model from a run config (YAML). Pipeline stages come from the "
                                   "DeepSpeed config it names (pipeline.stages); the remaining processes form "
                                   "data-parallel replicas.\n\nexamples:\n"
                                   "  comet-ds train --config launch/examples/tiny_cpu.yaml --dry-run\n"
                                   "  deepspeed --num_gpus 2 --module comet_ds.cli train --config RUN.yaml "
                                   "train.steps=50\n  launch/single_node.sh --procs 2 --config RUN.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, partition and memory "
                                                         "estimate, then exit")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks (results belong in docs/BENCHMARKS.md)")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bench.add_parser("forward", help="streaming forward: peak RSS and tokens/s against length",
                         description="Stream random token sequences through a CoMeT model on the tiny base, one "
                                     "fresh process per length, and report peak RSS and tokens/s.\n\n"
                                     "example: comet-ds bench forward --lengths 4k,32k,256k",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4k,32k,256k", type=lambda s: [_length(x) for x in s.split(",")],
                   help="comma-separated sequence lengths (default: 4k,32k,256k)")
    p.add_argument("--base", help="base model directory (default: a tiny base built in --workdir)")
    p.add_argument("--workdir", default="runs/bench", help="where the tiny base is built (default: runs/bench)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", help="also write the result rows to this JSON file")
    p.set_defaults(func=cmd_bench_forward)

    p = sub.add_parser("demo", help="the end-to-end demo on a tiny local base (CPU, minutes)",
                       description="Build a tiny base, wrap it with CoMeT and LoRA, check the streaming path "
                                   "against the layer-major reference, save/reload/export, and stream a long "
                                   "sequence in constant memory.\n\nexample: comet-ds demo --out runs/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    p.add_argument("--tokens", type=int, default=32768, help="tokens to stream at the end (default: 32768)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.set_defaults(func=cmd_demo)
    return parser


def _length(text: str) -> int:
    from comet_ds.bench.forward import parse_length

    return parse_length(text)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from comet_ds.config import CometInputError

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (CometInputError, FileNotFoundError) as err:
        print(f"comet-ds: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
