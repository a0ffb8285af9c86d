import json
import random
import re
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from datasets import load_from_disk
from helpers import read_all_events

from data_prep import user_behavior
from data_prep.cli import main
from data_prep.user_behavior import EVENT_SCHEMA, UserBuckets, format_time, questions

# user 1: views and carts item 10, buys it later; carts item 11, never buys it. user 2: one view.
ROWS = [
    ("1", "10", "100", "pv", 1511544070),
    ("1", "10", "100", "cart", 1511544100),
    ("2", "30", "300", "pv", 1511550000),
    ("1", "11", "100", "cart", 1511544200),
    ("1", "12", "200", "pv", 1511544300),
    ("1", "10", "100", "buy", 1511544400),
]


def as_batch(events):
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(zip(*events), EVENT_SCHEMA)],
                                      schema=EVENT_SCHEMA)


def csv_text(rows, header=False, sep=","):
    lines = [sep.join(("user_id", "item_id", "category_id", "behavior_type", "timestamp"))] if header else []
    return "\n".join(sep.join(map(str, r)) for r in rows) if not lines else \
        "\n".join(lines + [sep.join(map(str, r)) for r in rows])


@pytest.mark.parametrize("variant", ["csv", "csv-header", "tsv", "jsonl"])
def test_every_layout_reads_the_same_events(tmp_path, variant):
    path = tmp_path / "events.txt"
    if variant == "jsonl":
        keys = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
        path.write_text("".join(json.dumps(dict(zip(keys, r))) + "\n" for r in ROWS))
    else:
        path.write_text(csv_text(ROWS, header=variant == "csv-header", sep="\t" if variant == "tsv" else ",") + "\n")
    events = read_all_events(path)
    assert events[0] == ("1", 1511544070, "10", "100", "pv") and len(events) == 6


def test_a_column_mapping_reads_other_layouts(tmp_path):
    path = tmp_path / "retail.csv"
    path.write_text("timestamp,visitorid,event,itemid,cat\n1433221332117,257597,view,355908,7\n")
    events = read_all_events(path, {"user_id": "visitorid", "behavior_type": "event", "item_id": "itemid",
                             "category_id": "cat"})
    assert events == [("257597", 1433221332, "355908", "7", "view")]  # milliseconds → seconds


def test_spill_files_give_back_awkward_values_exactly(tmp_path):
    awkward = [("a\tb", 5, "x\\y", "line\nbreak", "pv"), ("a\tb", 3, "\\t", "c\r", "buy"),
               ("plain", 1, "1", "2", "cart"), ("\\", 2, "é", "🙂", "pv")]
    spill = UserBuckets(3, tmp_path)
    spill.add(as_batch(awkward[:2]))
    spill.add(as_batch(awkward[2:]))
    grouped = {h.user: list(zip(h.timestamps, h.items, h.categories, h.behaviors)) for h in spill.histories()}
    assert grouped == {"a\tb": [e[1:] for e in (awkward[1], awkward[0])], "plain": [awkward[2][1:]],
                       "\\": [awkward[3][1:]]}


def test_histories_keep_the_most_recent_events_in_time_order(tmp_path):
    events = [("u", stamp, f"i{stamp % 7}", "c", "pv") for stamp in (9, 3, 7, 1, 5)] + [("v", 4, "i", "c", "buy")]
    spill = UserBuckets(1, tmp_path)
    spill.add(as_batch(events))
    u, v = spill.histories(keep=3)
    assert (u.user, u.timestamps, v.timestamps) == ("u", [5, 7, 9], [4])
    assert u.text.splitlines() == ["Activity log of user u (3 events):",
                                   "1970-01-01 00:00:05 viewed item i5 (category c)",
                                   "1970-01-01 00:00:07 viewed item i0 (category c)",
                                   "1970-01-01 00:00:09 viewed item i2 (category c)"]
    assert v.text.endswith("00:00:04 bought item i (category c)\n")


@pytest.mark.parametrize("packed", [True, False])
def test_histories_order_events_like_python_sorts_tuples(tmp_path, monkeypatch, packed):
    """Ties on time are broken by item, category and behaviour, strings compare by code point."""
    if not packed:
        monkeypatch.setattr(user_behavior, "_PACKED_USERS", 0)  # the two-key sort for huge buckets
    rng = random.Random(0)
    events = [(rng.choice(["b", "a", "é", "Z", "🙂"]), rng.choice([7, 3, 3, 1]), rng.choice(["10", "9", "1é", "1e"]),
               rng.choice(["x", "X", "ß"]), rng.choice(["pv", "buy", "cart"])) for _ in range(400)]
    spill = UserBuckets(1, tmp_path)
    spill.add(as_batch(events))
    got = [(h.user, *e) for h in spill.histories() for e in zip(h.timestamps, h.items, h.categories, h.behaviors)]
    assert got == sorted(events)


def test_arrow_blocks_and_the_per_line_rules_read_the_same_events(tmp_path, monkeypatch):
    """Clean blocks go through Arrow's CSV reader, blocks with anything unusual line by line; with
    blocks of ~40 bytes both kinds interleave, and events, rejections and line numbers must not
    depend on which path a line took."""
    lines = [" 7 ,1,2,pv,1511544070", "7,1,2,buy,1511544070123", "8,\"1\",2,fav,1511544099", "",
             "8,1,2,pv,2017-11-24T17:21:10Z", "9,1,2", "9,1, ,pv,5", "9,1,2,pv,1511544070.5",
             "10,1,2,cart,99999999999999999999", "11,1,2,pv,5", "12,\u3000商品 ,类目,buy,6"]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(user_behavior, "_BLOCK_BYTES", 40)
    small_blocks = read_all_events(path)
    monkeypatch.setattr(user_behavior, "_NEEDS_PER_LINE_RULES", re.compile(rb"."))  # every line by the rules
    per_line = read_all_events(path)
    for read in (small_blocks, per_line):  # a block's events may follow its rejections: compare each in order
        assert [e for e in read if len(e) == 5] == [
            ("7", 1511544070, "1", "2", "pv"), ("7", 1511544070, "1", "2", "buy"), ("8", 1511544099, "1", "2", "fav"),
            ("8", 1511544070, "1", "2", "pv"), ("9", 1511544070, "1", "2", "pv"), ("11", 5, "1", "2", "pv"),
            ("12", 6, "商品", "类目", "buy")]
        assert [e for e in read if len(e) == 2] == [
            (6, "3 fields, expected 5"), (7, "missing 'category_id'"),
            (9, "timestamp '99999999999999999999' is outside the years 1970 to 9999")]


def test_json_strings_with_lone_surrogates_are_rejected(tmp_path):
    path = tmp_path / "events.jsonl"
    record = '{"user_id": "1", "item_id": "%s", "category_id": "3", "behavior_type": "pv", "timestamp": 5}\n'
    path.write_text(record % "\\ud800" + record % "\\ud83d\\ude00")  # lone, then a valid pair (an emoji)
    (_, rejected), event = read_all_events(path)
    assert rejected == "a string holds a lone UTF-16 surrogate" and event[2] == "😀"


def test_times_format_in_utc():
    for stamp in (0, 59, 86_399, 86_400, 951_782_400, 1_511_544_070, 4_102_444_799):
        assert format_time(stamp) == datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def test_questions_answer_from_the_history():
    events = sorted((ts, item, cat, b) for user, item, cat, b, ts in ROWS if user == "1")
    history = user_behavior.History("1", "", *map(list, zip(*events)))
    qa = {q.question: q.answer for pool in questions(history).values() for q in pool}
    assert qa["Which item did the user buy last?"] == "10"
    assert qa["How many times did the user perform 'added to cart' on items of category 100?"] == "2"
    assert qa["Which category did the user interact with most often?"] == "100"
    assert qa["Did the user buy item 10 after adding it to the cart?"] == "yes"
    assert qa["Did the user buy item 11 after adding it to the cart?"] == "no"
    assert qa["When was the user's first activity?"] == format_time(1511544070) == "2017-11-24 17:21:10"
    assert qa["When was the user's last activity?"] == "2017-11-24 17:26:40"


def test_cli_spills_rejects_and_is_deterministic(base_dirs, tmp_path, capsys):
    path = tmp_path / "UserBehavior.csv"
    damaged = [b"1,10,100,pv,yesterday", b"1,10,100", b"3,1,1,pv,caf\xe9", b""]
    path.write_bytes((csv_text(ROWS) + "\n").encode() + b"\n".join(damaged))
    outputs = []
    for name, bucket_mb in (("one", "256"), ("many", "0.00001")):  # one bucket vs one per byte-ish: same data
        main(["user-behavior", str(path), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / name),
              "--bucket-mb", bucket_mb, "--questions-per-user", "2", "--quiet"])
        outputs.append(load_from_disk(str(tmp_path / name / "data")).to_dict())
    assert outputs[0] == outputs[1]
    assert "read 9 events = 6 used + 3 rejected; wrote 4 samples" in capsys.readouterr().out
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "one" / "rejects.jsonl").read_text().splitlines()]
    assert reasons == ["bad timestamp 'yesterday'", "3 fields, expected 5", "not UTF-8"]
    manifest = json.loads((tmp_path / "many" / "manifest.json").read_text())
    assert manifest["spill_buckets"] > 1 and manifest["events_read"] == 9
    rows = load_from_disk(str(tmp_path / "one" / "data"))
    assert all(r["text"].startswith("Activity log of user") for r in rows)
    assert {r["sample_id"].split("/")[0] for r in rows} == {"1", "2"}


def test_a_large_input_streams_in_bounded_memory(base_dirs, tmp_path):
    """A 256 MB log against a 1 MB one, each in a fresh comet-prep process: with spill buckets of 8 MB
    the peak RSS stays within a fixed margin, where holding the events would take several times the
    input."""
    from comet_ds.bench.prep import run_prep, write_user_behavior_csv

    peaks = {}
    for megabytes in (1, 256):
        source = tmp_path / f"events-{megabytes}.csv"
        events = write_user_behavior_csv(source, megabytes, seed=megabytes)
        run = run_prep(["user-behavior", str(source), "--tokenizer", base_dirs["llama"], "--bucket-mb", "8",
                        "--max-events-per-user", "5", "--questions-per-user", "1",
                        "--output", str(tmp_path / f"out-{megabytes}")])
        assert run["summary"].startswith(f"read {events} events = {events} used + 0 rejected")
        peaks[megabytes] = run["peak_rss_mib"]
    assert peaks[256] < peaks[1] + 150, peaks
