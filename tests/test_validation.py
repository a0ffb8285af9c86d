"""Bad settings, paths and inputs are refused with one line that names them, before any work starts."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, refusal, save_dataset, write_run

from comet_ds.cli import main
from comet_ds.config import CometConfig, CometConfigError
from comet_ds.configs import example_run_config
from comet_ds.infer.generate import SamplingSettings
from comet_ds.resources import free_port
from comet_ds.train.config import RunConfig, load_run_config

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# -- the DeepSpeed config ---------------------------------------------------------------------------


def run_with_deepspeed(tmp_path: Path, deepspeed: object) -> RunConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(deepspeed))
    return RunConfig(base_model="base", dataset="data", output_dir=str(tmp_path), deepspeed_config=str(path))


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        ([{"pipeline": {"stages": 2}}], "must be a JSON object"),
        (5, "must be a JSON object"),
        ({"zero_optimization": {"stage": "1"}}, "zero_optimization.stage must be 0 or 1 (got '1')"),
        ({"zero_optimization": {"stage": True}}, "zero_optimization.stage must be 0 or 1 (got True)"),
        ({"zero_optimization": 5}, "zero_optimization must be an object"),
        ({"zero_optimization": {"stage": 2}}, "ZeRO stage 2 does not combine with pipeline parallelism"),
        ({"pipeline": {"stages": "2"}}, "pipeline.stages must be a positive integer (got '2')"),
        ({"pipeline": 2}, "pipeline must be an object"),
        ({"bf16": {"enabled": "yes"}}, "bf16.enabled must be true or false (got 'yes')"),
        ({"fp16": True}, "fp16 must be an object"),
    ],
)
def test_deepspeed_config_of_the_wrong_shape_names_the_key(tmp_path, deepspeed, message):
    run = run_with_deepspeed(tmp_path, deepspeed)
    with pytest.raises(CometConfigError) as err:
        run.pipeline_stages()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_is_refused_without_a_gpu(tmp_path, monkeypatch, precision):
    run = run_with_deepspeed(tmp_path, {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1},
                                        precision: {"enabled": True}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CometConfigError, match=f"enables {precision}, which needs a GPU, and none is visible"):
        run.check_precision()
    cpu = run_with_deepspeed(tmp_path, json.loads((REPO / "ds_configs" / "cpu_fp32_2stage.json").read_text()))
    cpu.check_precision()


def test_a_packaged_deepspeed_config_is_named_by_its_short_name(tmp_path):
    run = RunConfig(base_model="base", dataset="data", output_dir=str(tmp_path), deepspeed_config="gpu_bf16_4stage")
    assert run.pipeline_stages() == 4
    assert run.deepspeed_dict()["bf16"] == {"enabled": True}


@pytest.mark.parametrize("deepspeed_config", ["cpu_fp32", "cpu_fp32_2stage.yaml", "ds_configs"])
def test_an_unknown_deepspeed_config_name_lists_the_packaged_ones(tmp_path, capsys, deepspeed_config):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base", "dataset": "data", "output_dir": str(tmp_path / "out"),
                                      "deepspeed_config": deepspeed_config}))
    err = refusal(capsys, lambda: main(["train", "--config", str(config), "--dry-run"]))
    assert f"deepspeed_config {deepspeed_config!r} is not a packaged DeepSpeed config; name one of " \
           "cpu_fp32_2stage, gpu_bf16_4stage, gpu_bf16_8stage or give the path of a .json file" in err


# -- the run config ---------------------------------------------------------------------------------


EXAMPLE = Path(str(example_run_config()))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.nan", "train.lr must be a finite number > 0 (got nan)"),
        ("train.lr=nan", "train.lr must be a finite number > 0 (got nan)"),
        ("train.lr=.inf", "train.lr must be a finite number > 0 (got inf)"),
        ("train.grad_clip=.nan", "train.grad_clip must be a finite number >= 0 (got nan)"),
        ("train.weight_decay=.inf", "train.weight_decay must be a finite number >= 0 (got inf)"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0 (got -1)"),
        ("train.lr_schedule=linear", "train.lr_schedule must be one of cosine, constant (got 'linear')"),
        ("comet.memory_lr_multiplier=.inf", "memory_lr_multiplier must be a positive number (got inf)"),
        ("finetune.lora_targets=q_proj", "finetune.lora_targets must be a list of module names"),
        ("finetune.lora_targets=[q_proj, 3]", "finetune.lora_targets must be a list of module names"),
        ("train.steps=[1", "override 'train.steps=[1': the value is not valid YAML (line 1: "),
        ("comet={chunk_size: 8, chunk_size: 16}", "the key 'chunk_size' is given twice"),
    ],
)
def test_run_config_values_out_of_range_name_the_setting(override, message):
    with pytest.raises(CometConfigError) as err:
        load_run_config(EXAMPLE, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- base_model: x\n", "must be a mapping of settings at the top level (got a list)"),
        ("42\n", "must be a mapping of settings at the top level (got 42)"),
        (EXAMPLE.read_text() + "train:\n  steps: 3\n",
         f"repeats the key 'train' (line {len(EXAMPLE.read_text().splitlines()) + 1})"),
        ("base_model: a\ncomet: {chunk_size: 8, chunk_size: 16}\n", "repeats the key 'chunk_size' (line 2)"),
    ],
)
def test_run_config_file_of_the_wrong_shape_is_refused(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(CometConfigError) as err:
        load_run_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes("base_model: caf\u00e9\n".encode("latin-1")), "is not UTF-8 text"),
        (lambda p: p.write_text("base_model: [a\ntrain: {}\n"), "is not valid YAML: line 2: while parsing"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
)
def test_unreadable_run_config_is_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "run.yaml"
    make(path)
    err = refusal(capsys, lambda: main(["train", "--config", str(path), "--dry-run"]))
    assert str(path) in err and message in err


# -- datasets and the launcher (through `comet-ds train`) -------------------------------------------


@pytest.mark.parametrize(
    ("rows", "max_tokens", "message"),
    [
        (([], []), None, "has no rows"),
        (([[5, 6, 7]] * 2, [[-100, -100, -100]] * 2), None, "has no labelled tokens to train on"),
        (([[5, 6, 7]], [[6, -100, -100]]), None, "has no labelled tokens to train on"),  # the first label never trains
        (([[5, 6, 7, 8]], [[-100, -100, -100, 8]]), 3, "has no labelled tokens within train.max_tokens (3)"),
    ],
)
def test_dataset_with_nothing_to_train_is_refused_in_preflight(base_dirs, tmp_path, capsys, rows, max_tokens,
                                                               message):
    data = save_dataset(tmp_path / "data", *rows)
    path = write_run(tmp_path, base_dirs["llama"], data, train={"max_tokens": max_tokens})
    err = refusal(capsys, lambda: main(["train", "--config", str(path), "--dry-run"]))
    assert f"dataset {data} {message}" in err


def test_train_without_the_launcher_says_how_to_launch(base_dirs, passkey_data, tmp_path, capsys, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = write_run(tmp_path, base_dirs["llama"], passkey_data)
    err = refusal(capsys, lambda: main(["train", "--config", str(path)]))
    assert "deepspeed --num_gpus N --module comet_ds.cli train --config" in err
    assert "launch/single_node.sh --procs N --config" in err
    assert not (tmp_path / "run").exists()


def test_train_with_half_precision_on_a_cpu_is_refused_before_the_process_group(base_dirs, passkey_data, tmp_path,
                                                                               capsys, monkeypatch):
    # what torchrun and the deepspeed launcher both set, for a 1-process group that must never form
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    deepspeed = {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    path = write_run(tmp_path, base_dirs["llama"], passkey_data, deepspeed=deepspeed)
    err = refusal(capsys, lambda: main(["train", "--config", str(path)]))
    assert "enables bf16, which needs a GPU, and none is visible" in err and "deepspeed_config: cpu_fp32_2stage" in err


def test_the_launcher_check_names_exactly_the_variables_missing(monkeypatch):
    from comet_ds.train.loop import require_launcher

    for name, value in zip(LAUNCHER_VARIABLES, ("1", "2", "1")):
        monkeypatch.setenv(name, value)
    assert require_launcher() is None
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(CometConfigError, match=r"runs under a launcher, which sets RANK, LOCAL_RANK: start it"):
        require_launcher()


# -- command-line numbers and sampling settings -----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "passkey", "--model", "m", "--samples", "0"],
        ["eval", "passkey", "--model", "m", "--threads", "0"],
        ["eval", "passkey", "--model", "m", "--batch-size", "0"],
        ["eval", "qa", "--model", "m", "--data", "d", "--max-new-tokens", "0"],
        ["demo", "--threads", "0"],
        ["demo", "--scale", "0"],
        ["demo", "--eval-samples", "0"],
        ["bench", "forward", "--threads", "0"],
        ["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "-5"],
        ["generate", "--model", "m", "--prompt", "x", "--top-p", "2"],
        ["generate", "--model", "m", "--prompt", "x", "--top-p", "0"],
        ["generate", "--model", "m", "--prompt", "x", "--top-p", "nan"],
        ["generate", "--model", "m", "--prompt", "x", "--top-k", "-3"],
        ["generate", "--model", "m", "--prompt", "x", "--temperature", "0"],
        ["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"],
        ["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"],
        ["generate", "--model", "m", "--prompt", "x", "--temperature", "inf"],
    ],
)
def test_command_line_numbers_out_of_range_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    option = next(a for a in argv if a.startswith("--") and a not in ("--model", "--prompt", "--data"))
    assert f"error: argument {option}: " in err and "Traceback" not in err


@pytest.mark.parametrize(
    "settings",
    [{"max_new_tokens": 0}, {"temperature": 0.0}, {"temperature": math.nan}, {"temperature": math.inf},
     {"top_p": 1.5}, {"top_p": math.nan}, {"top_k": -3}, {"max_new_tokens": 2.5}],
)
def test_sampling_settings_out_of_range_are_refused(settings):
    with pytest.raises(CometConfigError, match=next(iter(settings))):
        SamplingSettings(**settings)


def test_comet_config_refuses_an_infinite_learning_rate_multiplier():
    with pytest.raises(CometConfigError, match="memory_lr_multiplier must be a positive number"):
        CometConfig(memory_lr_multiplier=math.inf)


# -- prompts for `comet-ds generate` ----------------------------------------------------------------


def test_empty_prompt_is_refused(capsys):
    err = refusal(capsys, lambda: main(["generate", "--model", "nowhere", "--prompt", ""]))
    assert "--prompt is empty" in err


def test_generate_output_that_is_a_directory_is_refused_before_loading(tmp_path, capsys):
    err = refusal(capsys, lambda: main(["generate", "--model", "nowhere", "--prompt", "x", "--output",
                                        str(tmp_path)]))
    assert f"--output {tmp_path} is a directory" in err


@pytest.mark.parametrize("value", [7, None, ["a"], "", {"text": "a"}])
def test_prompts_file_with_a_bad_prompt_names_the_line(tmp_path, capsys, value):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + json.dumps({"prompt": value}) + "\n")
    err = refusal(capsys, lambda: main(["generate", "--model", "nowhere", "--prompts", str(prompts)]))
    assert f"{prompts}:3: " in err and "non-empty string" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b'{"prompt": "caf\xe9"}\n'), "is not UTF-8 text"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("{not json\n"), ":1: expected a JSON object"),
    ],
)
def test_unreadable_prompts_file_is_one_line(tmp_path, capsys, make, message):
    prompts = tmp_path / "prompts.jsonl"
    make(prompts)
    err = refusal(capsys, lambda: main(["generate", "--model", "nowhere", "--prompts", str(prompts)]))
    assert "comet-ds: error: " in err and message in err
