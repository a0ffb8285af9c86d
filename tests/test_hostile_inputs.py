"""Hostile and careless input: every case is one line and exit 2 (or a usage line), before any model
loads where it can be checked then; never a traceback, never lost work, never data read twice."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAJECTORY, interruptible, refusal, save_dataset, write_run

from comet_ds.cli import main as comet_ds
from data_prep.cli import main as prep


def damaged(adapter: Path, tmp_path: Path, name: str, content: bytes | None) -> str:
    """A copy of `adapter` whose file `name` holds `content` (None: the file is missing)."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(adapter, copy)
    if content is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(content)
    return str(copy)


def truncated(adapter: Path, name: str) -> bytes:
    return (adapter / name).read_bytes()[:100]


# (name, argv builder, words the line must hold): damaged model files, outputs that would overwrite an input
# and impossible sizes, each of which could otherwise surface as a traceback, an error after the work, or exit 0
COMET_DS_CASES = [
    ("comet_config.json not JSON", lambda a, t, b: ["generate", "--model", damaged(a, t, "comet_config.json", b"{x"),
                                                    "--prompt", "hi"], "comet_config.json is damaged"),
    ("comet_config.json a list", lambda a, t, b: ["generate", "--model", damaged(a, t, "comet_config.json", b"[1]"),
                                                  "--prompt", "hi"], "not an object"),
    ("truncated memory weights", lambda a, t, b: ["generate", "--model", damaged(
        a, t, "comet_memory.safetensors", truncated(a, "comet_memory.safetensors")), "--prompt", "hi"],
     "comet_memory.safetensors is damaged"),
    ("truncated adapter weights", lambda a, t, b: ["generate", "--model", damaged(
        a, t, "adapter_model.safetensors", truncated(a, "adapter_model.safetensors")), "--prompt", "hi"],
     "adapter_model.safetensors is damaged"),
    ("export of an adapter without its weights", lambda a, t, b: [
        "export", "--merge", "--adapter", damaged(a, t, "adapter_model.safetensors", None), "--out", str(t / "out")],
     "adapter_model.safetensors is missing"),
    ("export of truncated memory weights", lambda a, t, b: [
        "export", "--merge", "--adapter", damaged(a, t, "comet_memory.safetensors", truncated(
            a, "comet_memory.safetensors")), "--out", str(t / "out")], "comet_memory.safetensors is damaged"),
    ("export without --merge", lambda a, t, b: ["export", "--adapter", str(a), "--out", str(t / "out")],
     "comet-ds: error: export writes merged models only"),
    ("init-base --hidden-size 3", lambda a, t, b: ["init-base", "--out", str(t / "base"), "--hidden-size", "3"],
     "multiple of 8"),
    ("init-base larger than memory", lambda a, t, b: ["init-base", "--out", str(t / "base"), "--hidden-size",
                                                      "1000000", "--pretrain-steps", "0"], "GiB available"),
    ("eval passkey --lengths too short", lambda a, t, b: ["eval", "passkey", "--model", str(a), "--lengths", "5",
                                                          "--device", "cpu", "--out", str(t / "eval")],
     "--lengths: length 5 is too short"),
    ("eval qa on a dataset without answers", lambda a, t, b: ["eval", "qa", "--model", str(a), "--data", str(
        unanswered(t)), "--device", "cpu", "--out", str(t / "eval")], "no row with a labelled answer"),
    ("generate --output in a missing directory", lambda a, t, b: [
        "generate", "--model", str(t / "not-loaded"), "--prompt", "hi", "--output", str(t / "no" / "out.jsonl")],
     "--output"),
    ("generate --output onto its --prompts", lambda a, t, b: [
        "generate", "--model", str(t / "not-loaded"), "--prompts", prompts(t), "--output", prompts(t)],
     "is also an input"),
    ("bench forward --base missing", lambda a, t, b: ["bench", "forward", "--base", str(t / "nope")], "--base"),
    ("bench pipeline --base missing", lambda a, t, b: ["bench", "pipeline", "--base", str(t / "nope")], "--base"),
    ("bench forward --json in a missing directory", lambda a, t, b: [
        "bench", "forward", "--base", b, "--lengths", "64", "--json", str(t / "no" / "b.json")], "--json"),
    ("bench prep --tokenizer without tokenizer files", lambda a, t, b: [
        "bench", "prep", "--tokenizer", str(t), "--user-behavior-mb", "0.01", "--agent-logs-mb", "0",
        "--workdir", str(t / "w")], "not a tokenizer directory"),
]


def unanswered(tmp_path: Path) -> Path:
    from datasets import Dataset

    path = tmp_path / "unanswered"
    Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[-100, -100, -100]]}).save_to_disk(str(path))
    return path


def prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.jsonl"
    if not path.exists():
        path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    return str(path)


@pytest.mark.parametrize("build, says", [c[1:] for c in COMET_DS_CASES], ids=[c[0] for c in COMET_DS_CASES])
def test_comet_ds_refuses_in_one_line(adapter, base_dirs, tmp_path, capsys, build, says):
    argv = build(adapter, tmp_path, base_dirs["llama"])
    capsys.readouterr()  # what building the input printed
    before = (tmp_path / "prompts.jsonl").read_bytes() if (tmp_path / "prompts.jsonl").exists() else None
    assert says in refusal(capsys, lambda: comet_ds(argv))
    assert not (tmp_path / "out").exists() and not (tmp_path / "base").exists()
    if before is not None:  # the prompts stay as they were
        assert (tmp_path / "prompts.jsonl").read_bytes() == before


@pytest.mark.parametrize("argv, says", [
    (["bench", "prep", "--user-behavior-mb", "-1"], "argument --user-behavior-mb: -1 is out of range"),
    (["bench", "prep", "--agent-logs-mb", "nan"], "argument --agent-logs-mb: nan is out of range"),
])
def test_comet_ds_bench_sizes_are_usage_errors(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        comet_ds(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["agent-logs", "user-behavior"])
@pytest.mark.parametrize("spelling", ["same", "other"])
def test_comet_prep_refuses_an_input_given_twice(base_dirs, tmp_path, capsys, command, spelling):
    """Reading one file twice would train on each of its records twice, with nothing said."""
    source = tmp_path / ("x.jsonl" if command == "agent-logs" else "x.csv")
    source.write_text(json.dumps(TRAJECTORY) + "\n" if command == "agent-logs" else "1,2,3,pv,1511544070\n")
    again = source if spelling == "same" else tmp_path / "." / source.name
    err = refusal(capsys, lambda: prep([command, str(source), str(again), "--tokenizer", base_dirs["llama"],
                                         "--output", str(tmp_path / "out"), "--quiet"]))
    assert "is given twice" in err
    assert not (tmp_path / "out").exists()


def test_comet_prep_names_a_directory_given_as_input(base_dirs, tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    err = refusal(capsys, lambda: prep(["agent-logs", str(tmp_path / "logs"), "--tokenizer", base_dirs["llama"],
                                         "--output", str(tmp_path / "out")]))
    assert "is a directory" in err


def test_comet_prep_refuses_a_spill_dir_that_is_no_directory(base_dirs, tmp_path, capsys):
    source = tmp_path / "x.csv"
    source.write_text("1,2,3,pv,1511544070\n")
    err = refusal(capsys, lambda: prep(["user-behavior", str(source), "--tokenizer", base_dirs["llama"],
                                         "--spill-dir", str(source), "--output", str(tmp_path / "out")]))
    assert "--spill-dir" in err and "not a directory" in err


@pytest.mark.parametrize("option, value, says", [
    ("--lengths", "inf", "not a whole positive token count"),
    ("--lengths", "nan", "not a whole positive token count"),
    ("--depths", "nan", "give a count (5) or fractions"),
    ("--depths", "1000000000", "the number of depths must be from 1 to 1000"),
])
def test_comet_prep_retrieval_numbers_are_usage_errors(base_dirs, tmp_path, capsys, option, value, says):
    with pytest.raises(SystemExit) as exit_info:
        prep(["passkey", "--tokenizer", base_dirs["llama"], option, value, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("cache", ["[]", '{"PATH": 5}'])
def test_a_damaged_weights_cache_is_ignored(base_dirs, tmp_path, monkeypatch, cache):
    from comet_ds.modeling.pretrained import base_weights_fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    clean = base_weights_fingerprint(base_dirs["llama"])
    weights = str((Path(base_dirs["llama"]) / "model.safetensors").resolve())
    (tmp_path / "cache" / "comet_ds").mkdir(parents=True)
    (tmp_path / "cache" / "comet_ds" / "weights-sha256.json").write_text(cache.replace("PATH", weights))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert base_weights_fingerprint(base_dirs["llama"]) == clean


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_init_base_leaves_no_scratch(tmp_path, signum):
    parent = tmp_path / "out"
    parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = interruptible([sys.executable, "-m", "comet_ds", "init-base", "--out", str(parent / "base"),
                             "--layers", "1", "--pretrain-steps", "100000"], env)
    deadline = time.monotonic() + 60
    while not list(parent.glob(".base.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(parent.iterdir()) == []


def test_dry_run_says_when_the_only_checkpoint_is_the_last_step(base_dirs, tmp_path, capsys):
    """train.steps=10**20 with save_every above it is a run that never checkpoints before its end: the
    dry run is where that can be said before the time is spent."""
    data = save_dataset(tmp_path / "data", [[5, 6, 7, 8]], [[-100, 6, 7, 8]])
    path = write_run(tmp_path, base_dirs["llama"], data, train={"save_every": 10**21})
    comet_ds(["train", "--config", str(path), "--dry-run", "train.steps=100000000000000000000"])
    assert "the only checkpoint is the last step's" in capsys.readouterr().out
