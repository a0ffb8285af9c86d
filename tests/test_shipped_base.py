"""The pretrained tiny base shipped inside the package: the files are the ones recorded, they load as a
Hugging Face model, and the documented command that built them starts exactly as it did."""

from __future__ import annotations

import json
import shlex
from importlib.resources import files

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from comet_ds.cli import main as comet_ds
from comet_ds.config import CometInputError
from comet_ds.modeling import tiny_base
from data_prep.fs import file_sha256

SHIPPED = files("comet_ds.modeling") / tiny_base.SHIPPED_BASE


def documented_build() -> dict[str, str]:
    """The options of the command build.json records, e.g. {"--arch": "llama", "--pretrain-steps": "2500"}."""
    words = shlex.split(tiny_base.shipped_base_record()["command"])
    assert words[:2] == ["comet-ds", "init-base"]
    return dict(zip(words[2::2], words[3::2]))


def model_config(folder) -> dict:
    """config.json without `transformers_version`: that records which release wrote the file, not the model."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


def test_the_shipped_files_match_their_recorded_hashes():
    record = tiny_base.shipped_base_record()
    assert {entry.name for entry in SHIPPED.iterdir()} == {*record["sha256"], tiny_base.BUILD_RECORD}
    for name, digest in record["sha256"].items():
        assert file_sha256(str(SHIPPED / name)) == digest, name


def test_the_shipped_base_is_what_the_documented_command_builds(tmp_path):
    build = documented_build()
    out = tmp_path / "base"
    comet_ds(["init-base", "--out", str(out), "--shipped"])
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rebuilt_tokenizer = tiny_base.train_tokenizer(seed=int(build["--seed"]))
    assert tokenizer.get_vocab() == rebuilt_tokenizer.get_vocab()
    fresh = tiny_base.tiny_model(build["--arch"], len(rebuilt_tokenizer), seed=int(build["--seed"]),
                                 tokenizer=rebuilt_tokenizer)
    fresh.save_pretrained(tmp_path / "fresh")
    assert model_config(out) == model_config(tmp_path / "fresh")
    # the recorded first steps of pretraining, rerun from the same initial weights and schedule
    summary = json.loads((out / tiny_base.PRETRAINING_SUMMARY).read_text())
    assert summary["steps"] == int(build["--pretrain-steps"])
    rerun = tiny_base.pretrain(fresh, rebuilt_tokenizer, summary["steps"], seed=int(build["--seed"]),
                               progress=False, stop_after=len(summary["early_losses"]))
    assert rerun["early_losses"] == pytest.approx(summary["early_losses"], rel=1e-5)
    # and the weights shipped are a trained model's: its loss on the corpus is far below the first steps'
    assert summary["final_loss"] < summary["early_losses"][0] / 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_damaged_shipped_file_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    record = tiny_base.shipped_base_record()
    record["sha256"]["model.safetensors"] = "0" * 64
    monkeypatch.setattr(tiny_base, "shipped_base_record", lambda: record)
    with pytest.raises(CometInputError, match=r"model\.safetensors does not match its recorded sha256"):
        tiny_base.install_shipped_base(tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


def test_shipped_takes_no_build_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        comet_ds(["init-base", "--out", str(tmp_path / "base"), "--shipped", "--layers", "2"])
    assert "drop --layers or --shipped" in capsys.readouterr().err
