"""`comet-prep`: raw material → Arrow datasets for `comet-ds`. Each subcommand's --help has an example."""

from __future__ import annotations

import argparse
import sys

from comet_ds.argtypes import depths, token_counts

DESCRIPTION = """\
Turn raw material into long-context training and evaluation sets (datasets Arrow format, with a
manifest.json beside the data).

  comet-prep passkey --tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/passkey
"""


def cmd_passkey(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from data_prep.output import write_dataset
    from data_prep.passkey import passkey_samples

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    samples = passkey_samples(tokenizer, args.lengths, args.depths, args.samples_per_cell, args.seed)
    rows = ({"input_ids": s.input_ids, "labels": s.labels, "source": "passkey", "sample_id": f"passkey-{i}",
             "text": s.text, "answer": s.passkey, "depth": s.depth, "length": len(s.input_ids)}
            for i, s in enumerate(samples))
    manifest = write_dataset(rows, args.output, args.tokenizer,
                             {"source": "passkey", "lengths": args.lengths, "depths": args.depths,
                              "seed": args.seed})
    print(f"wrote {manifest['samples']} passkey samples ({manifest['tokens']['total']:,} tokens) to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comet-prep", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("passkey", help="synthetic passkey-retrieval samples at given lengths and depths",
                       description="Filler text with one 5-digit pass key hidden at each depth, then the question; "
                                   "only the answer digits are trained.\n\nexample: comet-prep passkey "
                                   "--tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/passkey",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    p.add_argument("--lengths", type=token_counts, default=[2048], help="tokens per sample, e.g. 2k,8k (default: 2k)")
    p.add_argument("--depths", type=depths, default=[0.5],
                   help="a count of evenly spaced depths, or fractions like 0.1,0.5 (default: 0.5)")
    p.add_argument("--samples-per-cell", type=int, default=1, help="samples per (length, depth) (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="dataset directory to write (replaced atomically)")
    p.set_defaults(func=cmd_passkey)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"comet-prep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
