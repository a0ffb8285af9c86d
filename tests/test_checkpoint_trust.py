"""Checkpoints a resume can trust: verified against their manifest, RNG state loaded without pickle,
a diverging run stopped before it saves, and each step logged once after a resume."""

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ENV, losses, refusal, torchrun, write_short_run
from safetensors.torch import load_file

from comet_ds.cli import main
from comet_ds.train import checkpoint
from comet_ds.train.checkpoint import (
    MANIFEST,
    TRAINER_STATE,
    DamagedCheckpointError,
    NonFiniteError,
    _prune,
    checkpoint_problem,
    choose_resume_checkpoint,
    read_rng_state,
    save_checkpoint,
    save_rng_state,
    set_rng_state,
    write_manifest,
)
from comet_ds.train.tracking import Tracker, redact


class WritesMarker:
    """Unpickling this writes a file: proof that loading it ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


def fake_checkpoint(root: Path, step: int) -> Path:
    directory = root / f"step-{step}"
    (directory / "adapter").mkdir(parents=True)
    (directory / "layer_00-model_states.pt").write_bytes(bytes(range(256)) * 4)
    (directory / "adapter" / "comet_config.json").write_text("{}\n")
    (directory / TRAINER_STATE).write_text(json.dumps({"step": step}) + "\n")
    write_manifest(directory)
    return directory


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def test_manifest_names_the_changed_missing_or_extra_file(tmp_path):
    directory = fake_checkpoint(tmp_path, 2)
    assert checkpoint_problem(directory) is None
    flip_bytes(directory / "layer_00-model_states.pt")
    assert "layer_00-model_states.pt has changed" in checkpoint_problem(directory)

    directory = fake_checkpoint(tmp_path, 4)
    (directory / "adapter" / "comet_config.json").unlink()
    assert "adapter/comet_config.json is missing" in checkpoint_problem(directory)

    directory = fake_checkpoint(tmp_path, 6)
    (directory / "rng-0.pt").write_bytes(b"extra")
    assert "rng-0.pt is not in its manifest" in checkpoint_problem(directory)

    (directory / MANIFEST).unlink()
    assert f"no {MANIFEST}" in checkpoint_problem(directory)


def test_resume_latest_refuses_and_auto_falls_back_to_the_newest_that_verifies(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("step-4\n")
    flip_bytes(tmp_path / "step-4" / "layer_00-model_states.pt")
    with pytest.raises(DamagedCheckpointError, match=r"step-4 is damaged: layer_00-model_states.pt has changed"):
        choose_resume_checkpoint(tmp_path, "latest")
    tag, skipped = choose_resume_checkpoint(tmp_path, "auto")
    assert tag == "step-2"
    assert len(skipped) == 1 and "step-4" in skipped[0] and "layer_00-model_states.pt" in skipped[0]

    (tmp_path / "latest").write_text("../../elsewhere\n")
    with pytest.raises(DamagedCheckpointError, match=r"names '../../elsewhere', not a step-N checkpoint"):
        choose_resume_checkpoint(tmp_path, "latest")

    flip_bytes(tmp_path / "step-2" / TRAINER_STATE)
    with pytest.raises(DamagedCheckpointError, match=r"no checkpoint in .* verifies"):
        choose_resume_checkpoint(tmp_path, "auto")


def test_prune_keeps_the_newest_verified_checkpoint_and_what_it_did_not_write(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    flip_bytes(tmp_path / "step-6" / "layer_00-model_states.pt")
    (tmp_path / "step-final").mkdir()  # a user's directory
    (tmp_path / "step-8").mkdir()  # not a checkpoint this tool wrote (no trainer_state.json)
    _prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6", "step-8", "step-final"]


def test_rng_state_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(11)
    random.seed(11)
    save_rng_state(tmp_path / "rng-0.safetensors")
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(read_rng_state(tmp_path / "rng-0.safetensors"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert set(load_file(tmp_path / "rng-0.safetensors")) == {"torch"}


def test_rng_state_from_a_pickle_never_runs_it(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "rng-0.pt").write_bytes(pickle.dumps(WritesMarker(marker)))  # the name torch.save would give it
    with pytest.raises(DamagedCheckpointError, match=r"lacks rng-0.safetensors"):
        read_rng_state(tmp_path / "rng-0.safetensors")
    (tmp_path / "rng-0.safetensors").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(DamagedCheckpointError, match=r"rng-0.safetensors is not a valid RNG state"):
        read_rng_state(tmp_path / "rng-0.safetensors")
    assert not marker.exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.dist, "all_reduce", lambda tensor, op: None)  # one process: its own answer
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    engine = SimpleNamespace(module=module, device=torch.device("cpu"))
    with pytest.raises(NonFiniteError, match=r"trained weights at step 4 are not finite, so no checkpoint was saved"):
        save_checkpoint(engine, None, None, tmp_path, 4, None, "base", {}, keep=1)
    assert list(tmp_path.iterdir()) == []


def test_tracking_uri_password_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")  # unset during the test, and after it
    assert redact("https://alice:s3cr@t@mlflow.example:5000/x") == "https://alice:***@mlflow.example:5000/x"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, "exp", "http://alice:hunter2@127.0.0.1:9", None, enabled=True)
        tracker.log_params({"tracking": {"tracking_uri": "http://alice:hunter2@127.0.0.1:9"}})
        tracker.close()
    shown = " ".join(str(w.message) for w in caught) + tracker.tracking_uri
    assert "hunter2" not in shown and "alice:***@127.0.0.1:9" in shown
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # no run links with the password


def test_a_resumed_tracker_keeps_each_step_once(tmp_path):
    import mlflow

    first = Tracker(tmp_path, "exp", None, None, enabled=True)
    for step in (1, 2, 3, 4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a line cut short by a kill
    resumed = Tracker(tmp_path, "exp", None, None, enabled=True, resume_run_id=first.run_id, resume_step=2)
    for step in (3, 4, 5):
        resumed.log_metrics({"loss": float(step)}, step=step)
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert resumed.run_id == first.run_id
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4, 5]


def test_max_nonfinite_steps_must_be_positive():
    from comet_ds.config import CometConfigError
    from comet_ds.train.config import TrainSettings

    assert TrainSettings().max_nonfinite_steps == 3  # the diverging run below stops after 3 such steps
    with pytest.raises(CometConfigError, match=r"train\.max_nonfinite_steps must be >= 1"):
        TrainSettings(max_nonfinite_steps=0)


# --- real runs: two processes, two pipeline stages ---

@pytest.fixture(scope="module")
def four_step_run(base_dirs, passkey_data, tmp_path_factory) -> Path:
    """A finished 4-step run with verified checkpoints at steps 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("four_steps")
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data, steps=4, save_every=2, keep_checkpoints=3)
    done = subprocess.run(torchrun(config), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


def copy_of(run_dir: Path, tmp_path: Path, base: str, data: str) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return write_short_run(tmp_path, base, data, steps=4, save_every=2, keep_checkpoints=3)


@pytest.mark.parametrize(("damage", "named"), [
    (lambda d, marker: flip_bytes(d / "layer_02-model_states.pt"), "layer_02-model_states.pt has changed"),
    (lambda d, marker: (d / "rng-1.safetensors").unlink(), "rng-1.safetensors is missing"),
    (lambda d, marker: (d / "rng-0.safetensors").write_bytes(pickle.dumps(WritesMarker(marker))),
     "rng-0.safetensors has changed"),
    (lambda d, marker: (d / "rng-0.pt").write_bytes(pickle.dumps(WritesMarker(marker))),
     "rng-0.pt is not in its manifest"),
])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(base_dirs, passkey_data, four_step_run, tmp_path, capsys,
                                                         damage, named):
    config = copy_of(four_step_run, tmp_path, base_dirs["llama"], passkey_data)
    marker = tmp_path / "marker"
    damage(tmp_path / "run" / "checkpoints" / "step-4", marker)
    err = refusal(capsys, lambda: main(["train", "--config", str(config), "--resume"]))
    assert f"step-4 is damaged: {named}" in err and "--resume auto" in err
    assert not marker.exists()

    main(["train", "--config", str(config), "tracking.tracking_uri=https://alice:hunter2@mlflow.example",
          "--dry-run", "--resume", "auto"])
    out = capsys.readouterr().out
    assert "skipped checkpoint" in out and named in out and "resume from checkpoint step-2" in out
    assert "hunter2" not in out and "https://alice:***@mlflow.example" in out
    assert not marker.exists()


def test_resume_auto_trains_from_the_older_checkpoint_and_logs_each_step_once(base_dirs, passkey_data, four_step_run,
                                                                              tmp_path):
    import mlflow

    config = copy_of(four_step_run, tmp_path, base_dirs["llama"], passkey_data)
    run_dir = tmp_path / "run"
    flip_bytes(run_dir / "checkpoints" / "step-4" / "layer_02-model_states.pt")
    resumed = subprocess.run(torchrun(config, "--resume", "auto"), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped checkpoint" in resumed.stdout and "from step 2" in resumed.stdout
    got, expected = losses(run_dir), losses(four_step_run)
    assert sorted(got) == [1, 2, 3, 4] and all(len(values) == 1 for values in got.values())
    for step in (3, 4):  # retrained from step 2: the same losses as the first time
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6, abs=0)
    assert checkpoint_problem(run_dir / "checkpoints" / "step-4") is None

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("comet_ds").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]


def test_a_diverging_run_stops_nonzero_and_saves_nothing_non_finite(base_dirs, passkey_data, tmp_path):
    # lr 1e30: step 1's update leaves finite but huge weights; from step 2 on the loss is NaN
    config = write_short_run(tmp_path, base_dirs["llama"], passkey_data, steps=8, save_every=1, warmup_steps=0,
                             lr=1e30, keep_checkpoints=1)
    done = subprocess.run(torchrun(config), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "loss or gradient norm was not finite for 3 consecutive steps" in done.stderr
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapter").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-1"]
    kept = run_dir / "checkpoints" / "step-1"
    assert checkpoint_problem(kept) is None
    for file in [*kept.glob("trained-stage*.safetensors"), *(kept / "adapter").glob("*.safetensors")]:
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file
    assert math.isfinite(losses(run_dir)[1][0])
