import json

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from data_prep.agent_logs import Rejection, read_trajectories
from data_prep.agent_samples import questions, render
from data_prep.cli import main

OPENAI = {
    "id": "run-7",
    "messages": [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "Find the weather in Paris and Oslo."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C\nwind 3 km/h"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c3", "type": "function", "function": {"name": "search", "arguments": '{"q": "Oslo", "n": 3}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"error": "timeout"}'},
        {"role": "tool", "tool_call_id": "c3", "content": "Oslo is the capital of Norway."},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris is sunny; Oslo is unknown."}]},
    ],
}
SHAREGPT = {
    "id": "sg-1",
    "system": "Be brief.",
    "conversations": [
        {"from": "human", "value": "What is 2+3?"},
        {"from": "function_call", "value": '{"name": "calc", "arguments": {"expr": "2+3"}}'},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "It is 5."},
    ],
}
COMET = {"uniq_id": "cm-1", "messages": json.dumps([
    {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}])}


def write_jsonl(path, *records, raw_lines=()):
    with open(path, "wb") as handle:
        for record in records:
            handle.write((json.dumps(record) + "\n").encode())
        for line in raw_lines:
            handle.write(line + b"\n")
    return path


def test_each_format_parses_to_the_same_event_schema(tmp_path):
    (openai,) = [t for _, t in read_trajectories(write_jsonl(tmp_path / "a.jsonl", OPENAI))]
    assert openai.trajectory_id == "run-7"
    assert [s.role for s in openai.steps] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool",
                                              "assistant"]
    assert [s.tool_name for s in openai.steps if s.role == "tool"] == ["weather", "weather", "search"]
    (sharegpt,) = [t for _, t in read_trajectories(write_jsonl(tmp_path / "b.jsonl", SHAREGPT))]
    assert [s.role for s in sharegpt.steps] == ["system", "user", "assistant", "tool", "assistant"]
    assert sharegpt.steps[2].tool_calls[0].arguments == {"expr": "2+3"}
    (comet,) = [t for _, t in read_trajectories(write_jsonl(tmp_path / "c.jsonl", COMET))]
    assert comet.trajectory_id == "cm-1" and comet.steps[1].content == "hi"


def test_questions_have_the_answers_of_the_log(tmp_path):
    (trajectory,) = [t for _, t in read_trajectories(write_jsonl(tmp_path / "a.jsonl", OPENAI))]
    qa = {q.question: q.answer for pool in questions(trajectory).values() for q in pool}
    # computed here by hand from OPENAI above
    assert qa["Which tool did the agent use in its 1st tool call?"] == "weather"
    assert qa["Which tool did the agent use in its 3rd tool call?"] == "search"
    assert qa["In the 2nd call of weather, what was city?"] == "Oslo"
    assert qa["In the 1st call of search, what was n?"] == "3"
    assert qa["What did the 1st call of weather return? Give its first line."] == "Sunny, 21 C"
    assert qa["How many times did the agent call weather?"] == "2"
    assert qa["How many tool calls failed?"] == "1"
    assert qa["What was the agent's final answer?"] == "Paris is sunny; Oslo is unknown."
    text = render(trajectory)
    assert '[step 5] assistant calls search({"n": 3, "q": "Oslo"})' in text
    assert "[step 6] weather returned: {\"error\": \"timeout\"}" in text


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"messages": [{"role": "user", "content": "a"}', "bad JSON"),
        (b'{"messages": [{"role": "wizard", "content": "a"}]}', "unknown role 'wizard'"),
        (b'{"messages": [{"content": "a"}]}', "has no role"),
        (b'{"messages": []}', "messages is missing or empty"),
        (b'{"messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]}', "tool result without a matching"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate"),
        (b'{"text": "hello"}', "not an agent log record"),
        (b'[1, 2]', "not a JSON object"),
    ],
)
def test_each_kind_of_damage_is_rejected_with_its_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", raw_lines=[line])
    ((number, item),) = list(read_trajectories(path, "openai" if b"text" not in line else "auto"))
    assert number == 1 and isinstance(item, Rejection) and reason in str(item)


def test_cli_writes_samples_rejects_and_a_manifest(base_dirs, tmp_path, capsys):
    good = write_jsonl(tmp_path / "openai.jsonl", OPENAI, {**OPENAI, "id": "run-8"},
                       raw_lines=[b"{broken", b'{"messages": [{"role": "alien", "content": "x"}]}'])
    other = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    out = tmp_path / "out"
    main(["agent-logs", str(good), str(other), "--tokenizer", base_dirs["llama"], "--output", str(out),
          "--questions-per-log", "3", "--quiet"])
    printed = capsys.readouterr().out
    assert "read 5 records = 3 used + 2 rejected; wrote 12 samples" in printed  # 3 x (1 SFT + 3 QA)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"][:8]) for r in rejects] == [(3, "bad JSON"), (4, "message ")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records_read"] == 5 and manifest["records_rejected"] == 2 and len(manifest["inputs"]) == 2
    data = load_from_disk(str(out / "data"))
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    for row in data:
        trained = tokenizer.decode([t for t, x in zip(row["input_ids"], row["labels"]) if x != -100]).strip()
        if row["source"] == "agent-logs:sft":
            assert "calls weather" in trained or "calls calc" in trained or "hi" in trained
            assert "Find the weather" not in trained and "returned" not in trained  # only the assistant
        else:
            assert trained == row["answer"] and row["question"] in row["text"]


def test_same_inputs_and_seed_give_identical_data(base_dirs, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", OPENAI, SHAREGPT)
    for name in ("x", "y"):
        main(["agent-logs", str(path), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / name),
              "--seed", "5", "--quiet"])
    x, y = (load_from_disk(str(tmp_path / n / "data")) for n in "xy")
    assert x.to_dict() == y.to_dict()


def test_strict_mode_and_empty_inputs_fail_clearly(base_dirs, tmp_path):
    damaged = write_jsonl(tmp_path / "a.jsonl", OPENAI, raw_lines=[b"{broken"])
    with pytest.raises(SystemExit, match=r"--strict: record rejected at .*a.jsonl:2: bad JSON"):
        main(["agent-logs", str(damaged), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / "o"),
              "--strict", "--quiet"])
    useless = write_jsonl(tmp_path / "b.jsonl", raw_lines=[b"{broken"])
    with pytest.raises(SystemExit, match="no usable record"):
        main(["agent-logs", str(useless), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / "o"),
              "--quiet"])
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_num_proc_gives_the_same_bytes_and_max_tokens_counts_what_it_leaves_out(base_dirs, tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", OPENAI, SHAREGPT, OPENAI | {"id": "run-8"})
    for name, procs in (("one", "1"), ("two", "2")):
        main(["agent-logs", str(path), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / name),
              "--num-proc", procs, "--quiet"])
    one, two = tmp_path / "one" / "data", tmp_path / "two" / "data"
    for name in sorted(p.name for p in one.iterdir()):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    lengths = sorted(len(ids) for ids in load_from_disk(str(one))["input_ids"])
    limit = lengths[len(lengths) // 2]
    capsys.readouterr()
    main(["agent-logs", str(path), "--tokenizer", base_dirs["llama"], "--output", str(tmp_path / "short"),
          "--max-tokens", str(limit), "--quiet"])
    kept = load_from_disk(str(tmp_path / "short" / "data"))
    left_out = sum(1 for n in lengths if n > limit)
    assert max(len(ids) for ids in kept["input_ids"]) <= limit and len(kept) == len(lengths) - left_out
    assert f"({left_out} longer than --max-tokens left out)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    assert manifest["samples_too_long"] == left_out


def test_a_bad_tokenizer_directory_is_one_clear_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", OPENAI)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"--tokenizer .*: not a tokenizer directory"):
        main(["agent-logs", str(path), "--tokenizer", str(empty), "--output", str(tmp_path / "o"), "--quiet"])
