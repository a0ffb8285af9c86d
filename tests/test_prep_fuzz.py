"""Malformed input never stops comet-prep: every record or line is used or rejected with a reason.

Hand-written records first, each a kind of damage that could stop a reader (types where others are
expected, nesting deep enough to exhaust recursion), then generated ones: arbitrary JSON, near-valid
records of each agent-log format and arbitrary CSV/TSV/JSONL event lines, through the readers and the
sample builders.
"""

import json
import re
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import pytest
from helpers import read_all_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import jobs, user_behavior
from data_prep.agent_logs import Rejection, Trajectory, read_trajectories
from data_prep.cli import main
from data_prep.output import row_features
from data_prep.parallel import load_worker_tokenizer
from data_prep.user_behavior import read_events

DEEP = b"[" * 100_000 + b"]" * 100_000


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def read_agent_log(path: Path, fmt: str = "auto") -> list[tuple[int, Trajectory | Rejection]]:
    return list(read_trajectories(path, fmt))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"messages": [{"role": "user", "content": [{"text": 5}]}]}', "message 0: content part 0: text is a number"),
        (b'{"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}',
         "message 0: tool_calls is a string, not an array"),
        (b'{"messages": [{"role": "assistant", "content": "", "tool_calls": [5]}]}',
         "message 0: tool call 0 is a number, not an object"),
        (b'{"messages": [{"role": "assistant", "content": "", "function_call": "x"}]}',
         "message 0: function_call is a string, not an object"),
        (b'{"messages": ' + DEEP + b"}", "JSON nested deeper than"),
        (b'{"messages": [{"role": "user", "content": "\\ud800", "x": ' + DEEP + b"}]}", "JSON nested deeper than"),
        (b'{"messages": [{"role": "user", "content": "\\ud800", "x": ' + b"[" * 500 + b"]" * 500 + b"}]}",
         "JSON nested deeper than 100 levels"),  # parses, but json.dumps, pickle and repr of it recurse
        (b'{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "'
         + DEEP + b'"}}]}]}', "message 0: tool call 0: arguments: JSON nested deeper than"),
    ],
)
def test_records_that_could_stop_a_reader_are_rejected_not_fatal(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", [line])
    ((number, item),) = read_agent_log(path)
    assert number == 1 and isinstance(item, Rejection) and reason in str(item), item


def test_a_tool_result_nested_too_deep_for_json_is_read_as_text(tokenizer, tmp_path):
    result = DEEP.decode()
    record = {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": result}]}
    ((_, trajectory),) = read_agent_log(write_lines(tmp_path / "log.jsonl", [json.dumps(record).encode()]))
    rows = jobs.trajectory_rows(trajectory, ("qa",), 10, 0, None)
    assert any(row["text"].endswith("How many tool calls failed?\nAnswer: 0") for row in rows)


# --------------------------------------------------------------------------- timestamps


def read_events_both_ways(path: Path) -> list[tuple[list, list]]:
    """(events, rejections) as read (Arrow blocks where clean) and with every line by the per-line rules;
    apart, because a block read line by line gives its rejections before its events."""
    reads = []
    for per_line_rules in (user_behavior._NEEDS_PER_LINE_RULES, re.compile(rb".")):
        with patch.object(user_behavior, "_NEEDS_PER_LINE_RULES", per_line_rules):
            read = read_all_events(path)
        reads.append(([e for e in read if len(e) == 5], [e for e in read if len(e) == 2]))
    return reads


@pytest.mark.parametrize("stamp", ["１５１１５４４０７０", "١٥١١٥٤٤٠٧٠", "۱۵۱۱۵۴۴۰۷۰", "1511544070\u00b9",
                                   "1_511_544_070", "+1511544070", "２０１７-11-24T17:21:10", "1" * 5000])
def test_timestamps_in_other_digits_are_rejected_on_both_paths(tmp_path, stamp):
    path = tmp_path / "events.csv"
    path.write_text(f"1,2,3,pv,1511544070\n1,2,3,pv,{stamp}\n", encoding="utf-8")
    for events, ((line, reason),) in read_events_both_ways(path):
        assert events == [("1", 1511544070, "2", "3", "pv")]
        assert line == 2 and "timestamp" in reason


def test_seconds_and_milliseconds_are_told_apart_by_size_on_both_paths(tmp_path):
    stamps = {"1511544070": 1511544070, "9999999999": 9999999999, "0001511544070": 1511544070,
              "1511544070123": 1511544070, "1511544070.9": 1511544070, "1.511544070e9": 1511544070,
              "1511544070123.0": 1511544070}
    path = tmp_path / "events.csv"
    path.write_text("".join(f"u,i,c,pv,{stamp}\n" for stamp in stamps))
    for events, rejections in read_events_both_ways(path):
        assert [event[1] for event in events] == list(stamps.values()) and not rejections


def test_dates_without_a_zone_are_utc_and_dates_before_1970_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        path = tmp_path / "events.csv"
        path.write_text("u,i,c,pv,2017-11-24T17:21:10\nu,i,c,pv,1969-12-31T23:59:59Z\n")
        for events, rejections in read_events_both_ways(path):
            assert events == [("u", 1511544070, "i", "c", "pv")]
            assert rejections == [(2, "timestamp '1969-12-31T23:59:59Z' is outside the years 1970 to 9999")]
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'1,2,3\rx,pv,"5"', "bad CSV line: new-line character seen in unquoted field"),
        (b'1,2,"' + b"x" * 200_000 + b'",pv,5', "bad CSV line: field larger than field limit"),
        (b'{"user_id": [1], "item_id": 2, "category_id": 3, "behavior_type": "pv", "timestamp": 5}',
         "user_id is an array, not a string or a number"),
        (b'{"user_id": 1, "item_id": 2, "category_id": 3, "behavior_type": "pv", "timestamp": true}',
         "timestamp is a boolean"),
        (b'{"user_id": 1, "item_id": 2, "category_id": 3, "behavior_type": "pv", "timestamp": 1' + b"0" * 5000 + b"}",
         "bad JSON: a number with too many digits"),
        (b'{"user_id": ' + DEEP + b"}", "JSON nested deeper than"),
    ],
)
def test_event_lines_that_could_stop_the_reader_are_rejected(tmp_path, line, reason):
    path = write_lines(tmp_path / "events.txt", [line])
    ((number, rejection),) = read_all_events(path)
    assert number == 1 and reason in rejection


# --------------------------------------------------------------------------- generated agent logs

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TEXT = st.text(max_size=12) | st.sampled_from(["", "c1", "[[{", "\\ud800"])  # the last only looks like a surrogate
NUMBERS = st.integers(-(10**20), 10**20) | st.floats()  # floats include nan and infinities (JSON NaN, Infinity)
# junk values also hold lone surrogates: json.dumps escapes them, the readers must reject them
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT | st.text(st.characters(exclude_categories=()), max_size=4)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


def agent_records(junk: bool) -> dict[str, st.SearchStrategy]:
    """Records of each format: valid in shape, or (junk) near-valid: any field may hold any JSON value."""

    def field(valid: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(valid, valid, valid, JSON) if junk else valid

    call_ids = st.sampled_from(["c1", "c2", "c3"])
    arguments = st.dictionaries(TEXT, JSON, max_size=3)
    function = st.fixed_dictionaries({"name": field(st.sampled_from(["search", "weather"]))},
                                     optional={"arguments": field(arguments | arguments.map(json.dumps))})
    tool_call = st.fixed_dictionaries({"function": field(function)},
                                      optional={"id": field(call_ids), "type": st.just("function")})
    part = st.fixed_dictionaries({}, optional={"type": field(st.sampled_from(["text", "image_url"])),
                                               "text": field(TEXT)})
    message = st.fixed_dictionaries(
        {"role": field(st.sampled_from(["system", "user", "assistant", "assistant", "tool"]))},
        optional={"content": field(st.none() | TEXT | st.lists(field(part), max_size=3)),
                  "tool_calls": field(st.lists(field(tool_call), max_size=3)), "tool_call_id": field(call_ids),
                  "name": field(TEXT), "function_call": field(function)})
    messages = st.lists(field(message), min_size=1, max_size=6)
    call_text = st.builds(lambda name, args: json.dumps({"name": name, "arguments": args}), TEXT, arguments)
    turn = st.fixed_dictionaries({"from": field(st.sampled_from(["human", "gpt", "function_call", "observation"])),
                                  "value": field(TEXT | call_text)})
    return {"openai": st.fixed_dictionaries({"messages": field(messages)}, optional={"id": field(TEXT)}),
            "comet": st.fixed_dictionaries({"uniq_id": field(TEXT | NUMBERS),
                                            "messages": field(messages | messages.map(json.dumps))}),
            "sharegpt": st.fixed_dictionaries({"conversations": field(st.lists(field(turn), min_size=1, max_size=6))},
                                              optional={"id": field(TEXT), "system": field(TEXT)})}


VALID, NEAR_VALID = agent_records(junk=False), agent_records(junk=True)
RECORDS = {fmt: VALID[fmt] | NEAR_VALID[fmt] for fmt in VALID}


def jsonl_line(record) -> bytes:
    return json.dumps(record).encode()


# raw lines: damaged JSON, bytes that are not UTF-8, deep nesting, numbers past Python's digit limit
RAW_LINES = (st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
             | st.builds(lambda record, cut: jsonl_line(record)[:cut], JSON, st.integers(0, 60))
             | st.integers(90, 3000).map(lambda depth: b'{"messages": ' + b"[" * depth + b"]" * depth + b"}")
             | st.just(b'{"messages": [{"role": "user", "content": "x"}], "id": 1' + b"0" * 5000 + b"}"))


def agent_log_lines(records: st.SearchStrategy) -> st.SearchStrategy:
    records = records.map(jsonl_line)
    return st.lists(st.one_of(records, records, records, JSON.map(jsonl_line), RAW_LINES), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def tokenizer(base_dirs):
    load_worker_tokenizer(base_dirs["llama"])


def check_agent_log(lines: list[bytes], fmt: str) -> None:
    """Every non-blank line is a trajectory or a rejection with a reason, and every trajectory gives rows."""
    with tempfile.TemporaryDirectory() as scratch:
        path = write_lines(Path(scratch) / "log.jsonl", lines)
        read = read_agent_log(path, fmt)
    assert [number for number, _ in read] == [n for n, line in enumerate(lines, 1) if line.strip()]
    for _, item in read:
        assert isinstance(item, (Trajectory, Rejection)) and (isinstance(item, Trajectory) or str(item))
        if isinstance(item, Trajectory):
            for row in jobs.trajectory_rows(item, ("sft", "qa"), 4, 0, None):
                assert len(row["input_ids"]) == len(row["labels"])
                row_features(row)


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "comet"])
def test_generated_records_of_each_format_are_used_or_rejected(tokenizer, fmt):
    @FUZZ
    @given(agent_log_lines(RECORDS[fmt]))
    def check(lines):
        check_agent_log(lines, fmt)

    check()


def test_generated_records_of_any_format_are_used_or_rejected_when_detected(tokenizer):
    @FUZZ
    @given(agent_log_lines(st.one_of(*RECORDS.values())))
    def check(lines):
        check_agent_log(lines, "auto")

    check()


# --------------------------------------------------------------------------- generated event logs

# values a CSV field may hold: the usual kinds and the awkward ones (quotes, separators, carriage returns,
# control characters, other scripts' digits, numbers past int64)
FIELD = st.one_of(st.integers(0, 2 * 10**12).map(str), st.sampled_from(["pv", "buy", "cart", "fav"]),
                  st.sampled_from(["2017-11-24T17:21:10Z", "2017-11-24 17:21", "1969-12-31", "１５１１５４４０７０",
                                   "1e3", ".5", "nan", "inf", "99999999999999999999", "9" * 5000, '"', '"a,b"',
                                   "\r", '\r"', "\x00"]),
                  st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=6))
EVENT_VALUES = st.one_of(st.integers(0, 2 * 10**12), st.text(max_size=6), JSON)
EVENT_KEYS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
EVENT_RECORD = st.fixed_dictionaries({}, optional={key: EVENT_VALUES for key in EVENT_KEYS})


STAMP = st.one_of(st.integers(0, 2 * 10**12).map(str), st.integers(0, 10**10).map(lambda s: f" {s}.5 "), FIELD)
NAME = st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["a", " b ", "é", "商品"]), FIELD)


def delimited_line(separator: str) -> st.SearchStrategy:
    """Five fields that are mostly well formed, or any number of any fields."""
    event = st.tuples(NAME, NAME, NAME, st.sampled_from(["pv", "buy", "cart", "fav"]) | FIELD, STAMP)
    fields = st.one_of(event, event, st.lists(FIELD, min_size=3, max_size=6))
    return fields.map(lambda values: separator.join(values).encode())


EVENT_LINES = {
    "csv": st.one_of(delimited_line(","), delimited_line(","),
                     st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))),
    "tsv": st.one_of(delimited_line("\t"), st.text(max_size=20).map(lambda t: t.replace("\n", "").encode())),
    "jsonl": st.one_of(EVENT_RECORD.map(jsonl_line), EVENT_RECORD.map(jsonl_line), RAW_LINES),
}


def events_and_rejections(path: Path) -> tuple[list, list]:
    events, rejections = [], []
    for item in read_events(path, {}):
        if isinstance(item, tuple):
            assert str(item[1]), item
            rejections.append((item[0], str(item[1])))
        else:
            events.append(item)
    return events, rejections


def check_event_log(lines: list[bytes], tmp: Path) -> None:
    """Every non-blank line is an event or a rejection, whichever reading path it took, and every user's
    history gives rows."""
    path = write_lines(tmp / "events.txt", lines)
    batches, rejections = events_and_rejections(path)
    events = [event for batch in batches for event in zip(*(c.to_pylist() for c in batch.columns))]
    assert sum(batch.num_rows for batch in batches) + len(rejections) == sum(1 for line in lines if line.strip())
    with patch.object(user_behavior, "_BLOCK_BYTES", 64):  # Arrow blocks and per-line blocks interleave
        small_blocks = events_and_rejections(path)
    with patch.object(user_behavior, "_NEEDS_PER_LINE_RULES", re.compile(rb".")):
        per_line = events_and_rejections(path)
    for other_batches, other_rejections in (small_blocks, per_line):
        assert [e for b in other_batches for e in zip(*(c.to_pylist() for c in b.columns))] == events
        assert other_rejections == rejections
    spill = user_behavior.UserBuckets(2, tmp)
    for batch in batches:
        spill.add(batch)
    for history in spill.histories():
        for row in jobs.user_rows(history, 3, 0, None):
            assert len(row["input_ids"]) == len(row["labels"])
            row_features(row)


@pytest.mark.parametrize("layout", ["csv", "tsv", "jsonl"])
def test_generated_event_lines_are_used_or_rejected_alike_on_every_path(tokenizer, layout):
    @FUZZ
    @given(st.lists(EVENT_LINES[layout], min_size=1, max_size=10))
    def check(lines):
        with tempfile.TemporaryDirectory() as scratch:
            check_event_log(lines, Path(scratch))

    check()


# --------------------------------------------------------------------------- generated files through comet-prep

GOOD_RECORD = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
GOOD_EVENT = b"1,2,3,pv,1511544070"


def check_rejects(output: Path, path: Path, expected: list[int]) -> None:
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == expected
    assert all(r["file"] == str(path) and r["reason"] for r in rejects)


def test_comet_prep_agent_logs_accounts_for_every_generated_record(base_dirs, tmp_path):
    runs = iter(range(100))

    @settings(FUZZ, max_examples=3)
    @given(agent_log_lines(st.one_of(*RECORDS.values())))
    def check(lines):
        path = write_lines(tmp_path / "log.jsonl", [GOOD_RECORD, *lines])
        output = tmp_path / f"out-{next(runs)}"
        main(["agent-logs", str(path), "--tokenizer", base_dirs["llama"], "--output", str(output), "--quiet"])
        read = read_agent_log(path)
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["records_read"] == len(read) == sum(1 for line in [GOOD_RECORD, *lines] if line.strip())
        check_rejects(output, path, [n for n, item in read if isinstance(item, Rejection)])
        assert manifest["records_rejected"] == sum(isinstance(item, Rejection) for _, item in read)

    check()


def test_comet_prep_user_behavior_accounts_for_every_generated_line(base_dirs, tmp_path):
    runs = iter(range(100))

    @settings(FUZZ, max_examples=3)
    @given(st.lists(EVENT_LINES["csv"], min_size=1, max_size=10))
    def check(lines):
        path = write_lines(tmp_path / "events.csv", [GOOD_EVENT, *lines])
        output = tmp_path / f"out-{next(runs)}"
        main(["user-behavior", str(path), "--tokenizer", base_dirs["llama"], "--output", str(output), "--quiet"])
        _, rejections = events_and_rejections(path)
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["events_read"] == sum(1 for line in [GOOD_EVENT, *lines] if line.strip())
        check_rejects(output, path, [line for line, _ in rejections])
        assert manifest["events_rejected"] == len(rejections)

    check()
