import json

import pytest

from comet_ds.cli import main
from comet_ds.config import CometConfig
from comet_ds.eval.qa import normalize, token_f1
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.pretrained import build_comet, save_comet
from data_prep.cli import main as prep_main

CONFIG = CometConfig(chunk_size=64, global_slots=4, temp_stride=8, temp_budget=16)


@pytest.fixture(scope="module")
def adapter(base_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "adapter"
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    save_comet(model, tokenizer, out, FinetuneSettings(), base_dirs["llama"])
    return str(out)


def test_passkey_smoke_run_writes_json_heatmap_and_mlflow(adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "passkey", "--model", adapter, "--lengths", "200,400,800", "--depths", "3", "--out", str(out),
          "--baseline", "full-attention", "--baseline-budget-gib", "0.000001", "--threads", "1"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "800 tokens" in captured.err and "retrieved=" in captured.err  # the per-length progress bar
    result = json.loads((out / "passkey.json").read_text())
    assert [r["length"] for r in result["comet"]] == [200, 400, 800]
    for row in result["comet"]:
        assert set(row["accuracy_by_depth"]) == {"0.0", "0.5", "1.0"}
        assert 0.0 <= row["accuracy"] <= 1.0 and row["peak_mem_mib"] > 0 and row["tokens_per_s"] > 0
        assert len(row["samples"]) == 3 and all(len(s["passkey"]) == 5 for s in row["samples"])
    # with a tiny budget every full-attention length is skipped, and says why
    assert all("budget" in r["skipped"] for r in result["full_attention"]) and "skipped" in printed
    for name in ("passkey_heatmap.png", "passkey_cost.png", "mlflow.db"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "passkey_heatmap.png").read_bytes()[:4] == b"\x89PNG"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("comet_ds-eval").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [200, 400, 800]


def test_full_attention_baseline_runs_where_it_fits(adapter, tmp_path):
    out = tmp_path / "eval"
    main(["eval", "passkey", "--model", adapter, "--lengths", "200,33000", "--depths", "1", "--out", str(out),
          "--baseline", "full-attention", "--threads", "1"])
    result = json.loads((out / "passkey.json").read_text())
    baseline = result["full_attention"]
    assert baseline[0]["skipped"] is None and baseline[0]["peak_mem_mib"] > 0
    assert "positions" in baseline[1]["skipped"]  # the tiny base has 32768 positions
    assert result["comet"][1]["skipped"] is None  # CoMeT reads past them


def test_qa_scores_exact_match_and_f1(adapter, base_dirs, tmp_path, capsys):
    prep_main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "200", "--depths", "2",
               "--output", str(tmp_path / "data")])
    main(["eval", "qa", "--model", adapter, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "qa")])
    assert "exact_match=" in capsys.readouterr().err  # the progress bar
    result = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert result["scored"] == 2 and result["skipped"] == 0
    assert all(len(r["reference"].strip()) == 5 for r in result["rows"])  # the pass keys
    assert 0.0 <= result["f1"] <= 1.0


def test_answer_normalisation_and_f1():
    assert normalize("The  Pass-key, is: 12345!") == "passkey is 12345"
    assert token_f1("the key is 12345", "12345") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("abc", "") == 0.0
