"""`comet-prep`: raw material → Arrow datasets for `comet-ds`. Each subcommand's --help has an example."""

from __future__ import annotations

import argparse
import math
import sys

from comet_ds.argtypes import depths, token_counts

DESCRIPTION = """\
Turn raw material into long-context training and evaluation sets (datasets Arrow format, with a
manifest.json beside the data).

  comet-prep passkey --tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/passkey
  comet-prep needle --tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/needle
  comet-prep agent-logs trajectories.jsonl --tokenizer runs/base --output runs/agent
  comet-prep user-behavior UserBehavior.csv --tokenizer runs/base --output runs/users
"""


def cmd_passkey(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from data_prep.output import write_dataset
    from data_prep.passkey import passkey_samples

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    samples = passkey_samples(tokenizer, args.lengths, args.depths, args.samples_per_cell, args.seed, args.command)
    rows = ({"input_ids": s.input_ids, "labels": s.labels, "source": args.command,
             "sample_id": f"{args.command}-{i}",
             "text": s.text, "answer": s.passkey, "depth": s.depth, "length": len(s.input_ids)}
            for i, s in enumerate(samples))
    manifest = write_dataset(rows, args.output, args.tokenizer,
                             {"source": args.command, "lengths": args.lengths, "depths": args.depths,
                              "seed": args.seed})
    print(f"wrote {manifest['samples']} {args.command} samples ({manifest['tokens']['total']:,} tokens) "
          f"to {args.output}")


def cmd_agent_logs(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from data_prep.agent_logs import Rejection, read_trajectories
    from data_prep.agent_samples import questions, render, sft_sample
    from data_prep.output import file_sha256, write_dataset
    from data_prep.qa import pick_questions, qa_sample

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows, rejects, read, too_long = [], [], 0, 0
    progress = tqdm(unit=" records", disable=args.quiet)
    for path in map(Path, args.inputs):
        if not path.is_file():
            raise SystemExit(f"comet-prep agent-logs: input {path} does not exist")
        for line, item in read_trajectories(path, args.format):
            read += 1
            progress.update(1)
            if isinstance(item, Rejection):
                rejects.append({"file": str(path), "line": line, "reason": str(item)})
                continue
            samples = []
            if "sft" in args.kinds:
                samples.append(("agent-logs:sft", f"{item.trajectory_id}/sft", *sft_sample(tokenizer, item), "", ""))
            if "qa" in args.kinds:
                context = render(item)
                picked = pick_questions(questions(item), args.questions_per_log, item.trajectory_id, args.seed)
                for k, q in enumerate(picked):
                    samples.append((f"agent-logs:qa:{q.kind}", f"{item.trajectory_id}/qa{k}",
                                    *qa_sample(tokenizer, context, q), q.question, q.answer))
            for source, sample_id, ids, labels, question, answer in samples:
                if args.max_tokens and len(ids) > args.max_tokens:
                    too_long += 1
                    continue
                rows.append({"input_ids": ids, "labels": labels, "source": source, "sample_id": sample_id,
                             "text": tokenizer.decode(ids), "question": question, "answer": answer})
    progress.close()
    summary = (f"read {read} records = {read - len(rejects)} used + {len(rejects)} rejected; wrote {len(rows)} "
               f"samples" + (f" ({too_long} longer than --max-tokens left out)" if too_long else ""))
    if args.strict and rejects:
        first = rejects[0]
        raise SystemExit(f"comet-prep agent-logs: --strict: {len(rejects)} record(s) rejected, first at "
                         f"{first['file']}:{first['line']}: {first['reason']}")
    if not rows:
        raise SystemExit(f"comet-prep agent-logs: no usable record ({summary})")
    write_dataset(rows, args.output, args.tokenizer, {
        "source": "agent-logs", "records_read": read, "records_rejected": len(rejects),
        "samples_too_long": too_long, "kinds": args.kinds, "seed": args.seed,
        "inputs": {str(p): file_sha256(p) for p in args.inputs}}, rejects=rejects)
    print(f"{summary} to {args.output}")


def cmd_user_behavior(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from data_prep.agent_logs import Rejection
    from data_prep.output import file_sha256, write_dataset
    from data_prep.qa import pick_questions, qa_sample
    from data_prep.user_behavior import UserBuckets, questions, read_events, render_history, spill_directory

    mapping = dict(pair.split("=", 1) for pair in args.columns.split(",")) if args.columns else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        if not path.is_file():
            raise SystemExit(f"comet-prep user-behavior: input {path} does not exist")
    total_mb = sum(p.stat().st_size for p in inputs) / 2**20
    buckets = max(1, math.ceil(total_mb / args.bucket_mb))
    rows, rejects, read = [], [], 0
    with spill_directory(args.spill_dir) as scratch:
        spill = UserBuckets(buckets, Path(scratch))
        with tqdm(unit=" events", disable=args.quiet) as progress:
            for path in inputs:
                for line, item in read_events(path, mapping):
                    read += 1
                    progress.update(1)
                    if isinstance(item, Rejection):
                        rejects.append({"file": str(path), "line": line, "reason": str(item)})
                    else:
                        spill.add(*item)
        for user, events in spill.users():
            events = events[-args.max_events_per_user:] if args.max_events_per_user else events
            context = render_history(user, events)
            for k, q in enumerate(pick_questions(questions(events), args.questions_per_user, user, args.seed)):
                ids, labels = qa_sample(tokenizer, context, q)
                rows.append({"input_ids": ids, "labels": labels, "source": f"user-behavior:{q.kind}",
                             "sample_id": f"{user}/qa{k}", "text": tokenizer.decode(ids), "question": q.question,
                             "answer": q.answer})
    summary = f"read {read} events = {read - len(rejects)} used + {len(rejects)} rejected; wrote {len(rows)} samples"
    if args.strict and rejects:
        first = rejects[0]
        raise SystemExit(f"comet-prep user-behavior: --strict: {len(rejects)} event(s) rejected, first at "
                         f"{first['file']}:{first['line']}: {first['reason']}")
    if not rows:
        raise SystemExit(f"comet-prep user-behavior: no usable event ({summary})")
    write_dataset(rows, args.output, args.tokenizer, {
        "source": "user-behavior", "events_read": read, "events_rejected": len(rejects), "spill_buckets": buckets,
        "seed": args.seed, "inputs": {str(p): file_sha256(p) for p in inputs}}, rejects=rejects)
    print(f"{summary} to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comet-prep", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, what in (("passkey", "a 5-digit pass key (the LongLoRA protocol)"),
                       ("needle", "a 7-digit magic number for a named key (RULER-style single needle)")):
        p = sub.add_parser(name, help=f"synthetic retrieval samples: {what}",
                           description=f"Filler text with {what} hidden at each depth, then the question; only "
                                       f"the answer is trained.\n\nexample: comet-prep {name} --tokenizer runs/base "
                                       f"--lengths 2k,8k --depths 5 --output runs/{name}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
        p.add_argument("--lengths", type=token_counts, default=[2048], help="tokens per sample, e.g. 2k,8k "
                                                                            "(default: 2k)")
        p.add_argument("--depths", type=depths, default=[0.5],
                       help="a count of evenly spaced depths, or fractions like 0.1,0.5 (default: 0.5)")
        p.add_argument("--samples-per-cell", type=int, default=1, help="samples per (length, depth) (default: 1)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--output", required=True, help="dataset directory to write (replaced atomically)")
        p.set_defaults(func=cmd_passkey)

    p = sub.add_parser("agent-logs", help="agent trajectories (OpenAI, ShareGPT, CoMeT chat JSONL) → SFT and QA",
                       description="Read agent trajectories from JSONL files (OpenAI chat with tool_calls, "
                                   "ShareGPT conversations, or CoMeT uniq_id/messages; detected per file) and "
                                   "write supervised samples (assistant turns trained) and long-context QA "
                                   "samples whose answers are computed from the log. Malformed records go to "
                                   "rejects.jsonl with file, line and reason.\n\nexample: comet-prep agent-logs "
                                   "runs.jsonl --tokenizer runs/base --output runs/agent_data",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files")
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    p.add_argument("--format", choices=["auto", "openai", "sharegpt", "comet"], default="auto")
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["sft", "qa"], help="sft,qa (default: both)")
    p.add_argument("--questions-per-log", type=int, default=4, help="QA samples per trajectory (default: 4)")
    p.add_argument("--max-tokens", type=int, help="leave out samples longer than this (counted in the summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="fail if any record is rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", required=True, help="dataset directory to write (replaced atomically)")
    p.set_defaults(func=cmd_agent_logs)

    p = sub.add_parser("user-behavior", help="user event logs (CSV, TSV, JSONL) → per-user histories with QA",
                       description="Group events per user, order them by time, render each history as a readable "
                                   "log and ask questions answered from it (last item bought, counts per "
                                   "behaviour and category, top category, bought after carting, first and last "
                                   "activity). Default columns: user_id,item_id,category_id,behavior_type,"
                                   "timestamp (the Taobao UserBehavior layout), with or without a header.\n\n"
                                   "example: comet-prep user-behavior UserBehavior.csv --tokenizer runs/base "
                                   "--output runs/ub\n         comet-prep user-behavior events.csv --columns "
                                   "user_id=visitorid,item_id=itemid,behavior_type=event ...",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="CSV, TSV or JSONL files")
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    p.add_argument("--columns", help="our=theirs pairs for other layouts, e.g. user_id=visitorid,timestamp=ts")
    p.add_argument("--questions-per-user", type=int, default=3, help="QA samples per user (default: 3)")
    p.add_argument("--max-events-per-user", type=int, help="keep each user's most recent N events")
    p.add_argument("--bucket-mb", type=float, default=256.0,
                   help="input MB per spill bucket: bounds memory while grouping (default: 256)")
    p.add_argument("--spill-dir", help="where the spill buckets go (default: the system temp directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="fail if any event is rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", required=True, help="dataset directory to write (replaced atomically)")
    p.set_defaults(func=cmd_user_behavior)
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
