"""`comet-ds train`: preflight errors, real multi-process runs, exact resume after SIGKILL, two nodes."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import ENV, REPO, losses, refusal, torchrun, write_short_run

from comet_ds.cli import main
from comet_ds.resources import free_port


def test_dry_run_prints_config_partition_and_estimate(base_dirs, passkey_data, tmp_path, capsys):
    main(["train", "--config", str(write_short_run(tmp_path, base_dirs["llama"], passkey_data)), "--dry-run",
          "train.steps=3"])
    out = capsys.readouterr().out
    assert '"steps": 3' in out
    assert "stage 0: token embedding, inserted rows, layer 0" in out and "stage 1: layer 1, final norm, loss" in out
    assert "memory estimate" in out


def bad_dataset(tmp_path: Path) -> str:
    from datasets import Dataset

    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "bad"))
    return str(tmp_path / "bad")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda cfg, tmp: cfg.update(dataset=bad_dataset(tmp)), "lacks the column(s) input_ids, labels"),
        (lambda cfg, tmp: cfg["comet"].update(chunk_size=40000), "supports 32768 positions"),
        (lambda cfg, tmp: cfg.update(deepspeed_config=str(REPO / "ds_configs" / "gpu_bf16_4stage.json")),
         "4 pipeline stages for 2 decoder layers"),
        (lambda cfg, tmp: cfg["train"].update(stepz=3), "did you mean 'steps'"),
        (lambda cfg, tmp: cfg.update(dataset=str(tmp / "nowhere")), "is not a saved dataset"),
    ],
)
def test_bad_input_is_one_clear_line_before_any_process_starts(base_dirs, passkey_data, tmp_path, capsys,
                                                               change, message):
    path = write_short_run(tmp_path, base_dirs["llama"], passkey_data)
    config = yaml.safe_load(path.read_text())
    change(config, tmp_path)
    path.write_text(yaml.safe_dump(config))
    assert message in refusal(capsys, lambda: main(["train", "--config", str(path)]))


def test_a_fresh_run_never_overwrites_earlier_checkpoints(base_dirs, passkey_data, tmp_path, capsys):
    path = write_short_run(tmp_path, base_dirs["llama"], passkey_data)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-2\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path)])
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_an_adapter_directory_the_run_did_not_write_is_refused_before_training(base_dirs, passkey_data, tmp_path,
                                                                                capsys):
    path = write_short_run(tmp_path, base_dirs["llama"], passkey_data)
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "--dry-run"])
    assert "adapter is not empty and was not written by comet-ds train" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter" / "notes.txt").read_text() == "mine"


def test_an_override_after_resume_is_an_override():
    from comet_ds.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "run.yaml", "--resume", "train.steps=3"])
    assert (args.resume, args.late_overrides) == ("latest", ["train.steps=3"])
    assert build_parser().parse_args(["train", "--config", "run.yaml", "--resume", "auto"]).resume == "auto"


def test_unsupported_base_model_is_refused(passkey_data, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    path = write_short_run(tmp_path, str(tmp_path / "gpt2"), passkey_data)
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path)])
    assert "model type 'gpt2' is not supported" in capsys.readouterr().err


def test_sigkilled_run_resumes_with_the_same_losses(base_dirs, passkey_data, tmp_path):
    straight = write_short_run(tmp_path / "a", base_dirs["llama"], passkey_data)
    done = subprocess.run(torchrun(straight), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = losses(tmp_path / "a" / "run")
    assert sorted(expected) == list(range(1, 9))

    config = write_short_run(tmp_path / "b", base_dirs["llama"], passkey_data)
    run_dir = tmp_path / "b" / "run"
    proc = subprocess.Popen(torchrun(config), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for victim in victims:  # torchrun's workers run in sessions of their own: kill each one
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest != "step-8", "the run finished before it could be killed"

    resumed = subprocess.run(torchrun(config, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {latest.split('-')[1]}" in resumed.stdout
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step, values in got.items():  # each step once: the resume dropped the lines after its checkpoint
        assert len(values) == 1, (step, values)
        assert values[0] == pytest.approx(expected[step][0], rel=1e-6, abs=0), (step, values, expected[step])

    from comet_ds.modeling.pretrained import load_comet

    model, _, settings = load_comet(run_dir / "adapter")
    assert settings.method == "lora" and len(model.layers) == 2


def test_two_nodes_on_loopback_with_the_deepspeed_launcher(base_dirs, passkey_data, tmp_path):
    config = write_short_run(tmp_path, base_dirs["qwen3"], passkey_data, steps=3, save_every=3)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen([str(REPO / "launch" / "multi_node.sh"), "--hostfile", str(hostfile),
                               "--master-addr", "127.0.0.1", "--port", port, "--node-rank", str(rank),
                               "--config", str(config)], env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "trained 3 step(s)" in outputs[0]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["stages"] == 2 and state["replicas"] == 1


@pytest.fixture(scope="module")
def two_step_run(base_dirs, passkey_data, tmp_path_factory) -> Path:
    """A finished 2-step run (its adapter seeds later runs)."""
    tmp_path = tmp_path_factory.mktemp("two_steps")
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data, steps=2, save_every=2)
    done = subprocess.run(torchrun(config), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


def test_packed_documents_with_their_own_memories_and_mixed_chunk_plans_train(base_dirs, passkey_data, tmp_path):
    # 300-token samples packed two to a 640-token sequence, each document with its own memories and chunk plan
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data, steps=2, save_every=2, max_tokens=640,
                             packing=True, reset_memory_per_document=True, chunk_plan="mixed")
    done = subprocess.run(torchrun(config), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(len(values) == 1 and math.isfinite(values[0]) for values in losses(tmp_path / "run").values())


def test_mlflow_records_params_metrics_and_the_adapter(two_step_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{two_step_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("comet_ds").experiment_id])
    assert run.data.params["run.train.steps"] == "2"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "1"
    for metric in ("loss", "lr", "grad_norm", "tokens_per_s", "bubble_fraction", "peak_mem_mib_stage0",
                   "peak_mem_mib_stage1", "transfer_fraction_stage0", "transfer_fraction_stage1"):
        assert metric in run.data.metrics, metric
    for stage in (0, 1):  # two stages hand activations and gradients to each other every chunk
        assert 0 < run.data.metrics[f"transfer_fraction_stage{stage}"] < 1
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/comet_memory.safetensors" in artifacts


def test_init_from_starts_the_pipeline_from_an_earlier_adapter(base_dirs, passkey_data, two_step_run, tmp_path):
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.pretrained import load_comet
    from comet_ds.train.config import load_run_config
    from comet_ds.train.data import StepSampler, load_training_dataset

    # two accumulation groups of one sequence: the step's loss is the token mean over both sequences
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data, steps=1, save_every=1, accumulation_steps=2)
    run = load_run_config(config, [f"init_from={two_step_run / 'adapter'}"])
    config.write_text(yaml.safe_dump(run.to_dict()))
    done = subprocess.run(torchrun(config), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (first_loss,) = losses(tmp_path / "run")[1]

    # the same first batch through the seeding adapter in one process: the same loss
    model, _, _ = load_comet(two_step_run / "adapter")
    batch = StepSampler(load_training_dataset(passkey_data), 1, 2 * run.train.sequences_per_step, run.train.seed,
                        run.train.max_tokens).batch(0, 0)
    reference = model(ChunkLayout(run.comet, model.tokens).iter_chunks(batch.input_ids, batch.labels)).loss.item()
    assert first_loss == pytest.approx(reference, rel=1e-5)
    assert first_loss != pytest.approx(losses(two_step_run)[1][0], rel=1e-3)  # not a fresh start


@pytest.mark.parametrize(("override", "message"), [
    ("comet.chunk_size=32", "its comet differs in chunk_size (64 there, 32 here)"),
    ("finetune.lora_rank=4", "its finetune differs in lora_rank (8 there, 4 here)"),
])
def test_init_from_a_mismatched_model_is_refused(base_dirs, passkey_data, two_step_run, tmp_path, capsys,
                                                 override, message):
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data)
    err = refusal(capsys, lambda: main(["train", "--config", str(config), f"init_from={two_step_run / 'adapter'}",
                                        override]))
    assert message in err


def test_logged_mean_loss_covers_the_steps_since_the_last_log():
    from comet_ds.train.loop import mean_since_last_log

    losses = [1.0, 2.0, 3.0, 4.0, 5.0]  # steps 1-5, logged every 2 steps and at the last
    assert [mean_since_last_log(losses[:done], done, 0, 2) for done in (2, 4, 5)] == [1.5, 3.5, 5.0]
    assert mean_since_last_log([4.0, 5.0, 6.0], 6, 3, 4) == 5.5  # resumed after step 3, step 4 logged: steps 5-6
    assert mean_since_last_log([4.0], 4, 3, 2) == 4.0  # resumed after step 3, step 3 was logged before


def test_unreachable_tracking_server_does_not_stop_training(tmp_path):
    import warnings

    from comet_ds.train.tracking import Tracker

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, "exp", "http://127.0.0.1:9", None, enabled=True)
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"loss": 1.5}, step=1)
        tracker.log_metrics({"loss": 1.25}, step=2)
        tracker.close()
    assert len([w for w in caught if "unavailable" in str(w.message)]) == 1
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1.5, 1.25]


def test_environment_chooses_the_tracking_store_and_experiment(tmp_path, monkeypatch):
    from comet_ds.train.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    tracker = Tracker(tmp_path / "out", "from-config", "sqlite:///ignored.db", None, enabled=True)
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.close()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("from-env").experiment_id])
    assert run.data.metrics["loss"] == 2.0
    assert not (tmp_path / "out" / "mlflow.db").exists()
