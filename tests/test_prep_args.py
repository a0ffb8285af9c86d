"""comet-prep refuses bad options in one line, before any work."""

import pytest

from data_prep.cli import build_parser, main
from data_prep.user_behavior import check_columns

REQUIRED = {"agent-logs": ["log.jsonl", "--tokenizer", "tok", "--output", "out"],
            "user-behavior": ["events.csv", "--tokenizer", "tok", "--output", "out"],
            "passkey": ["--tokenizer", "tok", "--output", "out"]}


@pytest.mark.parametrize(
    ("command", "option", "value", "message"),
    [
        ("agent-logs", "--kinds", "sft,qna", "argument --kinds: unknown 'qna': choose from sft,qa"),
        ("agent-logs", "--kinds", "", "argument --kinds: unknown '': choose from sft,qa"),
        ("agent-logs", "--num-proc", "0", "argument --num-proc: 0 is out of range"),
        ("agent-logs", "--questions-per-log", "0", "argument --questions-per-log: 0 is out of range"),
        ("agent-logs", "--questions-per-log", "-2", "argument --questions-per-log: -2 is out of range"),
        ("agent-logs", "--questions-per-log", "2.5", "argument --questions-per-log: '2.5' is not a whole number"),
        ("user-behavior", "--questions-per-user", "0", "argument --questions-per-user: 0 is out of range"),
        ("user-behavior", "--max-events-per-user", "0", "argument --max-events-per-user: 0 is out of range"),
        ("user-behavior", "--bucket-mb", "0", "argument --bucket-mb: 0 is out of range"),
        ("user-behavior", "--bucket-mb", "-1", "argument --bucket-mb: -1 is out of range"),
        ("user-behavior", "--bucket-mb", "nan", "argument --bucket-mb: nan is out of range"),
        ("user-behavior", "--bucket-mb", "lots", "argument --bucket-mb: 'lots' is not a number"),
        ("user-behavior", "--columns", "user_id", "argument --columns: 'user_id' is not our=theirs"),
        ("user-behavior", "--columns", "user_id=", "argument --columns: 'user_id=' is not our=theirs"),
        ("user-behavior", "--columns", "userid=visitorid", "argument --columns: 'userid' is not one of our columns"),
        ("user-behavior", "--columns", "user_id=a,user_id=b", "argument --columns: user_id is given twice"),
        ("passkey", "--samples-per-cell", "0", "argument --samples-per-cell: 0 is out of range"),
    ],
)
def test_bad_options_are_one_usage_line(capsys, command, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *REQUIRED[command], option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: comet-prep")
    assert err.splitlines()[-1].startswith(f"comet-prep {command}: error: {message}"), err


def test_good_options_parse_to_their_values():
    args = build_parser().parse_args(["agent-logs", *REQUIRED["agent-logs"], "--kinds", "qa,sft,qa", "--num-proc", "2"])
    assert args.kinds == ["qa", "sft"] and args.num_proc == 2
    args = build_parser().parse_args(["user-behavior", *REQUIRED["user-behavior"], "--columns",
                                      "user_id=visitorid, timestamp = ts", "--bucket-mb", "0.5"])
    assert args.columns == {"user_id": "visitorid", "timestamp": "ts"} and args.bucket_mb == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ts,visitor,event,itemid,cat\n1433221332117,257597,view,355908,7\n",
         "has no column 'visitorid' (its first line has: ts, visitor, event, itemid, cat)"),
        ("257597,355908,7,view,1433221332117\n",  # no header: the mapped names are nowhere
         "has no columns 'visitorid', 'itemid', 'cat', 'event', 'ts' (its first line has: 257597, 355908, 7, view, "
         "1433221332117)"),
        ('{"ts": 1433221332117, "visitor": 257597, "event": "view", "itemid": 1, "cat": 7}\n',
         "has no column 'visitorid' (its first object has: ts, visitor, event, itemid, cat)"),
    ],
)
def test_columns_missing_from_the_input_are_one_line_naming_the_columns_present(base_dirs, tmp_path, capsys, text,
                                                                                  message):
    path = tmp_path / "events.csv"
    path.write_text(text)
    columns = "user_id=visitorid,behavior_type=event,item_id=itemid,category_id=cat,timestamp=ts"
    with pytest.raises(SystemExit) as exit_info:
        main(["user-behavior", str(path), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / "out"),
              "--columns", columns, "--quiet"])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith("comet-prep: error: --columns: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_columns_present_in_the_input_pass_the_check(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("timestamp,visitorid,event,itemid,cat\n1433221332117,257597,view,355908,7\n")
    mapping = {"user_id": "visitorid", "behavior_type": "event", "item_id": "itemid", "category_id": "cat"}
    assert check_columns(path, mapping) is None
    assert check_columns(path, {}) is None  # the default layout is not checked: a header-less file has none
    # the same header without one mapped column: the check looks at the header it passed
    with pytest.raises(ValueError, match=r"has no column 'category' \(its first line has: timestamp, visitorid,"):
        check_columns(path, {**mapping, "category_id": "category"})
