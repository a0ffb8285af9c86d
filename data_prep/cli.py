"""`comet-prep`: raw material → Arrow datasets for `comet-ds`. Each subcommand's --help has an example."""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from data_prep.argtypes import (
    choice_list,
    column_mapping,
    depth_specs,
    positive_float,
    positive_int,
    token_count,
    token_counts,
)
from data_prep.fs import OutputDirectoryError, check_output, file_sha256, is_inside, sigterm_unwinds
from data_prep.output import DatasetWriter
from data_prep.parallel import ordered_map

DESCRIPTION = """\
Turn raw material into long-context training and evaluation sets (datasets Arrow format, with a
manifest.json beside the data).

  comet-prep passkey --tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/passkey
  comet-prep needle --tokenizer runs/base --lengths 2k,8k --depths 5 --output runs/needle
  comet-prep agent-logs trajectories.jsonl --tokenizer runs/base --output runs/agent
  comet-prep user-behavior UserBehavior.csv --tokenizer runs/base --output runs/users
"""


def _check_tokenizer(args: argparse.Namespace) -> None:
    """Fail here, with one line, on a bad --tokenizer: a worker process failing to load it would not."""
    from data_prep.errors import CometInputError
    from data_prep.tokens import open_tokenizer

    try:
        open_tokenizer(args.tokenizer)
    except CometInputError as err:
        raise SystemExit(f"comet-prep {args.command}: {err}") from None


def _inputs(args: argparse.Namespace) -> list[Path]:
    inputs, seen = [Path(p) for p in args.inputs], {}
    for path in inputs:
        if not path.is_file():
            problem = "is a directory: name the files in it" if path.is_dir() else "does not exist"
            raise ValueError(f"input {path} {problem}")
        earlier = seen.setdefault(path.resolve(), path)
        if earlier is not path:  # every record would be read, and trained on, twice
            raise ValueError(f"input {path} is given twice (also as {earlier}): name each file once")
    return inputs


def _command(args: argparse.Namespace) -> str:
    return f"comet-prep {args.command}"


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an --output that must not or cannot be written before any work: not after an hour of it."""
    check_output(args.output, _command(args), overwrite=args.overwrite,
                 inputs=[args.tokenizer, *getattr(args, "inputs", [])])
    spill = getattr(args, "spill_dir", None)
    if spill and not Path(spill).is_dir():
        raise OutputDirectoryError(f"--spill-dir {spill} is not a directory: name an existing directory for the "
                                   "spill buckets")
    if spill and is_inside(spill, args.output):
        raise OutputDirectoryError(f"--spill-dir {spill} lies inside --output {args.output}: put the spill "
                                   "buckets elsewhere")


def _writer(args: argparse.Namespace, inputs: Iterable[Path] = (), keep_rejects: bool = True) -> DatasetWriter:
    return DatasetWriter(args.output, args.tokenizer, _command(args), overwrite=args.overwrite, inputs=inputs,
                         keep_rejects=keep_rejects)


def _reject(writer: DatasetWriter, args: argparse.Namespace, path: Path, line: int, reason: Exception) -> None:
    writer.reject(str(path), line, str(reason))
    if args.strict:  # raised inside the writer's block: nothing is written
        raise SystemExit(f"comet-prep {args.command}: --strict: record rejected at {path}:{line}: {reason}")


def _add_rows(writer: DatasetWriter, results: Iterable[list[dict | None]]) -> int:
    """Write every row; return how many were left out for exceeding --max-tokens (None)."""
    too_long = 0
    for rows in results:
        for row in rows:
            if row is None:
                too_long += 1
            else:
                writer.add(row)
    return too_long


def _summary(noun: str, read: int, writer: DatasetWriter, too_long: int) -> str:
    """read = used + rejected, always: nothing is dropped silently."""
    left_out = f" ({too_long} longer than --max-tokens left out)" if too_long else ""
    return (f"read {read} {noun} = {read - writer.rejected} used + {writer.rejected} rejected; wrote "
            f"{writer.samples} samples{left_out}")


def _held_out_keys(path: str | None, kind: str) -> frozenset[str]:
    """The keys in a --hold-out-keys file: one decimal key a line, blank lines ignored; at least one key of
    `kind`'s range must stay free to draw."""
    from data_prep.passkey import KEY_RANGES

    if path is None:
        return frozenset()
    try:
        lines = Path(path).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"comet-prep: --hold-out-keys {path}: cannot read it ({error})") from None
    if bad := next((line for line in lines if not line.isdecimal()), None):
        raise SystemExit(f"comet-prep: --hold-out-keys {path}: {bad[:40]!r} is not a key (one number a line)")
    held_out = frozenset(lines)
    low, high = KEY_RANGES[kind]
    if sum(low <= int(key) <= high for key in held_out) > high - low:
        raise SystemExit(f"comet-prep: --hold-out-keys {path} holds every {kind} key from {low} to {high}: "
                         "none would be left to draw")
    return held_out


def cmd_retrieval(args: argparse.Namespace) -> None:
    """passkey and needle."""
    from data_prep import jobs

    if args.max_tokens and max(args.lengths) > args.max_tokens:
        raise SystemExit(f"comet-prep {args.command}: --lengths reach {max(args.lengths):,} tokens, over "
                         f"--max-tokens {args.max_tokens:,}")
    _check_tokenizer(args)
    rng = random.Random(args.seed)  # one seed per sample: the same samples at any --num-proc
    cells = itertools.product(args.lengths, args.depths, range(args.samples_per_cell))
    held_out = _held_out_keys(args.hold_out_keys, args.command)
    tasks = [(i, args.command, length, depth, rng.randrange(2**63), held_out)
             for i, (length, depth, _) in enumerate(cells)]
    with _writer(args, keep_rejects=False) as writer:
        rows = ordered_map(jobs.retrieval_row, tasks, args.num_proc, args.tokenizer)
        for row in tqdm(rows, total=len(tasks), unit=" samples", disable=args.quiet):
            writer.add(row)
        manifest = writer.finish({"source": args.command, "lengths": args.lengths, "depths": args.depths,
                                  "seed": args.seed, "held_out_keys": len(held_out)})
    print(f"wrote {manifest['samples']} {args.command} samples ({manifest['tokens']['total']:,} tokens) "
          f"to {args.output}")


def cmd_agent_logs(args: argparse.Namespace) -> None:
    from data_prep import jobs
    from data_prep.agent_logs import Rejection, read_trajectories

    inputs = _inputs(args)
    _check_tokenizer(args)
    job = functools.partial(jobs.trajectory_rows, kinds=tuple(args.kinds), questions_per_log=args.questions_per_log,
                            seed=args.seed, max_tokens=args.max_tokens)
    with _writer(args, inputs) as writer, tqdm(unit=" records", disable=args.quiet) as progress:
        read = 0

        def trajectories() -> Iterator:
            nonlocal read
            for path in inputs:
                for line, item in read_trajectories(path, args.format):
                    read += 1
                    progress.update(1)
                    if isinstance(item, Rejection):
                        _reject(writer, args, path, line, item)
                    else:
                        yield item

        too_long = _add_rows(writer, ordered_map(job, trajectories(), args.num_proc, args.tokenizer))
        summary = _summary("records", read, writer, too_long)
        if not writer.samples:
            raise SystemExit(f"comet-prep agent-logs: no usable record ({summary})")
        writer.finish({"source": "agent-logs", "records_read": read, "records_rejected": writer.rejected,
                       "samples_too_long": too_long, "kinds": args.kinds, "seed": args.seed,
                       "inputs": {str(p): file_sha256(p) for p in inputs}})
    print(f"{summary} to {args.output}")


def cmd_user_behavior(args: argparse.Namespace) -> None:
    from data_prep import jobs
    from data_prep.user_behavior import UserBuckets, check_columns, read_events, spill_directory

    mapping = args.columns or {}
    inputs = _inputs(args)
    for path in inputs:
        check_columns(path, mapping)
    _check_tokenizer(args)
    buckets = max(1, math.ceil(sum(p.stat().st_size for p in inputs) / 2**20 / args.bucket_mb))
    job = functools.partial(jobs.user_rows, questions_per_user=args.questions_per_user, seed=args.seed,
                            max_tokens=args.max_tokens)
    with spill_directory(args.spill_dir) as scratch, _writer(args, inputs) as writer:
        spill = UserBuckets(buckets, Path(scratch))
        read = 0
        with tqdm(unit=" events", disable=args.quiet) as progress:
            for path in inputs:
                for item in read_events(path, mapping):
                    if isinstance(item, tuple):
                        read += 1
                        _reject(writer, args, path, *item)
                    else:
                        read += item.num_rows
                        spill.add(item)
                    progress.update(read - progress.n)
        histories = spill.histories(args.max_events_per_user)
        results = ordered_map(job, histories, args.num_proc, args.tokenizer)
        too_long = _add_rows(writer, tqdm(results, unit=" users", disable=args.quiet))
        summary = _summary("events", read, writer, too_long)
        if not writer.samples:
            raise SystemExit(f"comet-prep user-behavior: no usable event ({summary})")
        writer.finish({"source": "user-behavior", "events_read": read, "events_rejected": writer.rejected,
                       "samples_too_long": too_long, "spill_buckets": buckets, "seed": args.seed,
                       "inputs": {str(p): file_sha256(p) for p in inputs}})
    print(f"{summary} to {args.output}")


def _shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    p.add_argument("--max-tokens", type=token_count,
                   help="leave out samples longer than this, e.g. 32k (counted in the summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=positive_int, default=1,
                   help="processes that render and tokenise (default: 1, which tokenises on a thread beside "
                        "the reading one); the output is the same for any value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--output", required=True,
                   help="dataset directory to write: new or empty; it appears whole once the data is complete")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds an earlier output of this same command (anything else "
                        "is refused)")


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
        _shared_options(p)
        p.add_argument("--lengths", type=token_counts, default=[2048], help="tokens per sample, e.g. 2k,8k "
                                                                            "(default: 2k)")
        p.add_argument("--depths", type=depth_specs, default=[0.5],
                       help="a count of evenly spaced depths, fractions like 0.1,0.5, or ranges like 0-0.05,"
                            "0.25-0.5 that each sample draws its depth from uniformly (default: 0.5)")
        p.add_argument("--samples-per-cell", type=positive_int, default=1,
                       help="samples per (length, depth) (default: 1)")
        p.add_argument("--hold-out-keys", metavar="FILE",
                       help="keys no sample may use, one a line: an evaluation's, so that it scores keys never "
                            "seen in training (comet-ds demo writes its evaluation's keys this way)")
        p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("agent-logs", help="agent trajectories (OpenAI, ShareGPT, CoMeT chat JSONL) → SFT and QA",
                       description="Read agent trajectories from JSONL files (OpenAI chat with tool_calls, "
                                   "ShareGPT conversations, or CoMeT uniq_id/messages; detected per file) and "
                                   "write supervised samples (assistant turns trained) and long-context QA "
                                   "samples whose answers are computed from the log. Malformed records go to "
                                   "rejects.jsonl with file, line and reason.\n\nexample: comet-prep agent-logs "
                                   "runs.jsonl --tokenizer runs/base --output runs/agent_data",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files")
    _shared_options(p)
    p.add_argument("--format", choices=["auto", "openai", "sharegpt", "comet"], default="auto")
    p.add_argument("--kinds", type=choice_list("sft", "qa"), default=["sft", "qa"], help="sft,qa (default: both)")
    p.add_argument("--questions-per-log", type=positive_int, default=4, help="QA samples per trajectory (default: 4)")
    p.add_argument("--strict", action="store_true", help="fail if any record is rejected")
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
    _shared_options(p)
    p.add_argument("--columns", type=column_mapping,
                   help="our=theirs pairs for other layouts, e.g. user_id=visitorid,timestamp=ts")
    p.add_argument("--questions-per-user", type=positive_int, default=3, help="QA samples per user (default: 3)")
    p.add_argument("--max-events-per-user", type=positive_int, help="keep each user's most recent N events")
    p.add_argument("--bucket-mb", type=positive_float, default=32.0,
                   help="input MB per spill bucket: grouping holds one bucket's events in memory, about 6x "
                        "its size (default: 32)")
    p.add_argument("--spill-dir", help="where the spill buckets go (default: the system temp directory)")
    p.add_argument("--strict", action="store_true", help="fail if any event is rejected")
    p.set_defaults(func=cmd_user_behavior)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_unwinds():
            _check_output(args)
            args.func(args)
    except (ValueError, OSError) as err:
        print(f"comet-prep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{_command(args)}: interrupted; no scratch or spill directory left behind", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
