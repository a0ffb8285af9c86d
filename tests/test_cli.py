import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from comet_ds.cli import main
from comet_ds.configs import passkey_recipe
from comet_ds.demo import stage_run_config
from comet_ds.train.config import RunConfig


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "comet_ds", "--help"], capture_output=True, text=True, check=True)
    for command in ("init-base", "export", "bench", "demo"):
        assert command in done.stdout


def test_init_base_writes_a_pretrained_loadable_model(tmp_path, capsys):
    main(["init-base", "--out", str(tmp_path / "base"), "--arch", "qwen3", "--layers", "1", "--pretrain-steps", "40"])
    assert "wrote a tiny qwen3 base" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 1
    assert len(tokenizer) == model.config.vocab_size
    # the saved weights are the pretrained ones: held-out corpus text is far likelier than under random weights
    from comet_ds.modeling.tiny_base import synthetic_corpus, tiny_model

    ids = torch.tensor([tokenizer(" ".join(synthetic_corpus(40, seed=99)), add_special_tokens=False).input_ids[:200]])
    random_init = tiny_model("qwen3", len(tokenizer), num_layers=1, tokenizer=tokenizer)
    with torch.no_grad():
        trained_loss = model(input_ids=ids, labels=ids).loss.item()
        random_loss = random_init(input_ids=ids, labels=ids).loss.item()
    summary = json.loads((tmp_path / "base" / "pretraining.json").read_text())
    assert summary["steps"] == 40 and summary["final_loss"] < summary["first_loss"] - 1.0
    assert trained_loss < random_loss - 1.0


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(tmp_path / "missing"), "--merge", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a CoMeT model directory" in err and "Traceback" not in err


def test_every_passkey_recipe_stage_is_a_valid_run_config(tmp_path):
    """The run config the demo writes for each recipe stage passes the run config's checks, with the stage's
    own train settings over the shared ones."""
    recipe = yaml.safe_load(passkey_recipe().read_text())
    run = recipe["run"]
    for stage in recipe["stages"]:
        config = RunConfig.from_dict(stage_run_config(tmp_path, tmp_path / "base", run, stage, stage["steps"],
                                                      seed=0, init_from=tmp_path / "adapter"))
        assert config.comet.global_slots == run["comet"]["global_slots"]
        assert config.train.steps == stage["steps"] > 0
        for key, value in stage.get("train", {}).items():
            assert getattr(config.train, key) == value


def test_demo_runs_end_to_end_in_reduced_mode(tmp_path):
    """README's main command, shortened: 2-stage training through the deepspeed launcher included."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "comet_ds", "demo", "--out", str(tmp_path / "demo"), "--scale", "0.001",
               "--tokens", "2048", "--eval-samples", "1", "--eval-up-to", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = yaml.safe_load(passkey_recipe().read_text())["stages"]
    assert done.stdout.count("trained 2 step(s)") == len(stages)  # each stage from the one before's adapter
    assert (tmp_path / "demo" / "mlflow.db").is_file()
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert "MLflow store:" in done.stdout


def test_bench_prep_measures_comet_prep_against_the_tokenizer(base_dirs, tmp_path, capsys):
    main(["bench", "prep", "--user-behavior-mb", "0.3", "--agent-logs-mb", "0.2", "--tokenizer", base_dirs["llama"],
          "--workdir", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["command"] for r in rows] == ["user-behavior", "agent-logs"]
    for row in rows:
        assert row["samples"] > 0 and row["peak_rss_mib"] > 0
        assert row["tokenizer_tokens_per_s"] > 0 and row["tokenizer_one_thread_tokens_per_s"] > 0
        assert row["fraction_of_tokenizer"] == round(row["tokens_per_s"] / row["tokenizer_tokens_per_s"], 3)
    assert "of its one-thread" in capsys.readouterr().out
