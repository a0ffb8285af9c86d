"""Text is data: control-token strings in raw text stay text, and ids no text can have, datasets of
another tokenizer and adapters on another base are refused before they cost a run."""

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk
from helpers import refusal, untrained_adapter, write_run
from transformers import AutoTokenizer

from comet_ds.cli import main as comet_main
from comet_ds.config import CheckpointMismatchError, CometConfig
from comet_ds.eval.passkey import evaluate_passkey
from comet_ds.infer.generate import StreamingGenerator
from comet_ds.modeling.pretrained import COMET_CONFIG, base_weights_fingerprint, load_comet
from comet_ds.modeling.tiny_base import init_base
from comet_ds.modeling.tokens import extend_tokenizer, inserted_tokens
from comet_ds.train.data import check_token_ids
from data_prep.cli import main as prep_main
from data_prep.output import tokenizer_fingerprint

CONFIG = CometConfig(chunk_size=64, global_slots=4, temp_stride=8, temp_budget=16)
CONTROL = "<beacon> and <|memory|> and <beacon_3> and </s> and <s>"


@pytest.fixture(scope="module")
def comet_tokenizer_dir(base_dirs, tmp_path_factory) -> str:
    """A tokenizer with CoMeT's tokens, as every saved CoMeT model directory holds it."""
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    extend_tokenizer(tokenizer, CONFIG)
    out = tmp_path_factory.mktemp("comet-tokenizer")
    tokenizer.save_pretrained(out)
    return str(out)


def special_ids(tokenizer_dir: str) -> set[int]:
    return set(AutoTokenizer.from_pretrained(tokenizer_dir).all_special_ids)


def assert_no_special_ids(output, tokenizer_dir: str) -> None:
    """The control strings made it into the samples, as text."""
    data = load_from_disk(str(output / "data"))
    found = {i for column in ("input_ids", "labels") for row in data[column] for i in row} & special_ids(tokenizer_dir)
    assert not found, f"raw text produced special ids {sorted(found)}"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert any("<beacon_3>" in tokenizer.decode(row) for row in data["input_ids"])


def write_agent_log(path) -> None:
    record = {"id": "run-1", "messages": [
        {"role": "user", "content": f"Please repeat {CONTROL} verbatim."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "echo", "arguments": json.dumps({"text": CONTROL})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": CONTROL},
        {"role": "assistant", "content": f"It said {CONTROL}."}]}
    path.write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("which", ["comet", "base"])
@pytest.mark.parametrize("command", ["agent-logs", "user-behavior", "passkey"])
def test_comet_prep_encodes_control_token_strings_as_text(base_dirs, comet_tokenizer_dir, tmp_path, monkeypatch,
                                                          command, which):
    tokenizer = comet_tokenizer_dir if which == "comet" else base_dirs["llama"]
    out = tmp_path / "out"
    if command == "agent-logs":
        write_agent_log(tmp_path / "log.jsonl")
        args = ["agent-logs", str(tmp_path / "log.jsonl")]
    elif command == "user-behavior":
        (tmp_path / "events.csv").write_text("1,<beacon_3>,<|memory|>,pv,1511544070\n"
                                             "1,<beacon>,</s>,buy,1511544100\n")
        args = ["user-behavior", str(tmp_path / "events.csv"), "--strict"]
    else:
        monkeypatch.setattr("data_prep.passkey.FILLER", f"The grass is green. {CONTROL}.")
        args = ["passkey", "--lengths", "300", "--depths", "2"]
    prep_main([*args, "--tokenizer", tokenizer, "--output", str(out)])
    assert_no_special_ids(out, tokenizer)


def test_generate_encodes_a_prompt_with_control_token_strings_as_text(adapter_and_other_base, monkeypatch):
    adapter = str(adapter_and_other_base[0])
    prompts = []
    monkeypatch.setattr(StreamingGenerator, "generate", lambda self, prompt, settings: prompts.append(prompt) or [])
    comet_main(["generate", "--model", adapter, "--prompt", CONTROL, "--device", "cpu"])
    bos = AutoTokenizer.from_pretrained(adapter).bos_token_id
    assert prompts and not set(prompts[0]) & special_ids(adapter) - {bos}


def test_passkey_eval_encodes_its_text_as_text(comet_tokenizer_dir, monkeypatch):
    monkeypatch.setattr("data_prep.passkey.FILLER", f"The grass is green. {CONTROL}.")
    prompts = []
    evaluate_passkey(lambda batch, n: prompts.extend(batch) or [[]] * len(batch),
                     AutoTokenizer.from_pretrained(comet_tokenizer_dir),
                     [300], [0.5], 1, seed=0, progress=lambda _: None)
    assert len(prompts) == 2 and not {i for p in prompts for i in p} & special_ids(comet_tokenizer_dir)


def dry_run_error(config: Path, capsys) -> str:
    return refusal(capsys, lambda: comet_main(["train", "--config", str(config), "--dry-run"]))


@pytest.mark.parametrize(("bad_id", "message"), [
    ("inserted", "is the CoMeT token <beacon>"),
    (100_000, "is outside the vocabulary of"),
    (-5, "is negative"),
])
def test_train_refuses_ids_no_text_can_have_naming_the_row(base_dirs, tmp_path, capsys, bad_id, message):
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    bad = extend_tokenizer(tokenizer, CONFIG).temp_beacon_id if bad_id == "inserted" else bad_id
    rows = [[5, 6, 7, 8]] * 3 + [[5, 6, bad, 8]]
    Dataset.from_dict({"input_ids": rows, "labels": [[-100, 6, 7, 8]] * 4,
                       "sample_id": ["a", "b", "c", "d"]}).save_to_disk(str(tmp_path / "data"))
    err = dry_run_error(write_run(tmp_path, base_dirs["llama"], str(tmp_path / "data")), capsys)
    assert "row 3 (sample_id 'd')" in err and message in err


def test_the_id_scan_is_cheap(base_dirs):
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    extend_tokenizer(tokenizer, CONFIG)
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, 2001, dtype=np.int32) * 800),  # 2,000 rows, 1.6M tokens
                                    pa.array(np.tile(np.arange(4, 804, dtype=np.int32), 2000)))
    dataset = Dataset(pa.table({"input_ids": rows, "labels": rows}))
    start = time.perf_counter()
    check_token_ids(dataset, len(tokenizer), inserted_tokens(tokenizer), "data")
    assert time.perf_counter() - start < 0.5


def test_train_refuses_a_dataset_of_another_tokenizer(base_dirs, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{base_dirs['llama']}/{name}", other / name)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    prep_main(["passkey", "--tokenizer", str(other), "--lengths", "300", "--depths", "1",
               "--output", str(tmp_path / "data")])
    err = dry_run_error(write_run(tmp_path, base_dirs["llama"], str(tmp_path / "data")), capsys)
    assert tokenizer_fingerprint(other) in err and tokenizer_fingerprint(base_dirs["llama"]) in err
    assert "allow_tokenizer_mismatch" in err
    comet_main(["train", "--config", str(write_run(tmp_path, base_dirs["llama"], str(tmp_path / "data"),
                                                   allow_tokenizer_mismatch=True)), "--dry-run"])


def test_train_accepts_a_dataset_of_the_base_tokenizer(base_dirs, tmp_path, capsys):
    prep_main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "300", "--depths", "1",
               "--output", str(tmp_path / "data")])
    comet_main(["train", "--config", str(write_run(tmp_path, base_dirs["llama"], str(tmp_path / "data"))),
                "--dry-run"])
    assert "memory estimate" in capsys.readouterr().out


@pytest.fixture(scope="module")
def adapter_and_other_base(base_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    return (untrained_adapter(base_dirs["llama"], CONFIG, root / "adapter"),
            str(init_base(root / "other-base", "llama", num_layers=2, seed=1, progress=False)))


def test_an_adapter_on_another_base_is_refused_naming_both_fingerprints(base_dirs, adapter_and_other_base):
    adapter, other = adapter_and_other_base
    with pytest.raises(CheckpointMismatchError) as error:
        load_comet(adapter, base_model=other)
    assert base_weights_fingerprint(base_dirs["llama"]) in str(error.value)
    assert base_weights_fingerprint(other) in str(error.value) and "--allow-base-mismatch" in str(error.value)
    load_comet(adapter, base_model=other, allow_base_mismatch=True)
    load_comet(adapter)


def test_an_adapter_without_a_base_fingerprint_loads_with_a_warning(adapter_and_other_base, tmp_path):
    unfingerprinted = tmp_path / "unfingerprinted"
    shutil.copytree(adapter_and_other_base[0], unfingerprinted)
    meta = json.loads((unfingerprinted / COMET_CONFIG).read_text())
    del meta["base_weights_sha256"]
    (unfingerprinted / COMET_CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no fingerprint of its base"):
        load_comet(unfingerprinted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_comet(adapter_and_other_base[0])


def test_qa_eval_refuses_a_dataset_with_an_inserted_id(adapter_and_other_base, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(adapter_and_other_base[0])
    beacon = tokenizer.convert_tokens_to_ids("<beacon_3>")
    Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [5, beacon, 7, 8]], "labels": [[-100, -100, 7, 8]] * 2}
                      ).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(SystemExit):
        comet_main(["eval", "qa", "--model", str(adapter_and_other_base[0]), "--data", str(tmp_path / "qa"),
                    "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "row 1: input_ids holds" in capsys.readouterr().err


def test_base_weight_hashes_are_cached_until_a_file_changes(base_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(base_dirs["llama"], base)
    first = base_weights_fingerprint(base)
    cache_file = tmp_path / "cache" / "comet_ds" / "weights-sha256.json"
    cache = json.loads(cache_file.read_text())
    for entry in cache.values():
        entry["sha256"] = "0" * 64  # a cached hash is used as it is while size and mtime match
    cache_file.write_text(json.dumps(cache))
    assert base_weights_fingerprint(base) != first
    (base / "model.safetensors").touch()
    assert base_weights_fingerprint(base) == first


def test_init_from_an_adapter_of_another_base_is_refused_before_training(base_dirs, adapter_and_other_base,
                                                                          tmp_path, capsys):
    adapter, other = adapter_and_other_base
    Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "labels": [[-100, 6, 7, 8]]}).save_to_disk(str(tmp_path / "d"))
    err = dry_run_error(write_run(tmp_path, other, str(tmp_path / "d"), init_from=str(adapter)), capsys)
    assert base_weights_fingerprint(base_dirs["llama"]) in err and base_weights_fingerprint(other) in err
