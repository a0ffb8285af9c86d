import os
import subprocess
import sys

import pytest

from comet_ds.cli import main


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "comet_ds", "--help"], capture_output=True, text=True, check=True)
    for command in ("init-base", "export", "bench", "demo"):
        assert command in done.stdout


def test_init_base_writes_a_loadable_model(tmp_path, capsys):
    main(["init-base", "--out", str(tmp_path / "base"), "--arch", "qwen3", "--layers", "1"])
    assert "wrote a tiny qwen3 base" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(tmp_path / "base")) == model.config.vocab_size


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(tmp_path / "missing"), "--merge", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a CoMeT model directory" in err and "Traceback" not in err


def test_demo_runs_end_to_end_in_reduced_mode(tmp_path):
    """README's main command, shortened: 2-stage training through the deepspeed launcher included."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "comet_ds", "demo", "--out", str(tmp_path / "demo"), "--steps", "2",
                           "--train-tokens", "300", "--tokens", "2048"], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained 2 step(s)" in done.stdout
    assert (tmp_path / "demo" / "train" / "mlflow.db").is_file()
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert "MLflow store:" in done.stdout
