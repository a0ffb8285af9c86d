import json
import math
import re

import pytest
from datasets import Dataset
from helpers import untrained_adapter
from transformers import AutoTokenizer

from comet_ds.cli import main
from comet_ds.config import CometConfig
from comet_ds.eval.passkey import KEY_TOKENS, evaluate_passkey, evaluation_keys
from comet_ds.eval.qa import evaluate_qa, normalize, token_f1
from comet_ds.eval.report import loss_curves, stage_losses
from data_prep.cli import main as prep_main

CONFIG = CometConfig(chunk_size=64, global_slots=4, temp_stride=8, temp_budget=16)


@pytest.fixture(scope="module")
def adapter(base_dirs, tmp_path_factory):
    return str(untrained_adapter(base_dirs["llama"], CONFIG, tmp_path_factory.mktemp("eval") / "adapter"))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_passkey_smoke_run_writes_json_heatmap_and_mlflow(adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "passkey", "--model", adapter, "--lengths", "200,400,800", "--depths", "3", "--out", str(out),
          "--baseline", "full-attention", "--baseline-budget-gib", "0.000001", "--threads", "1",
          "--batch-size", "2"])  # a length's 3 prompts as 2 + 1
    captured = capsys.readouterr()
    printed = captured.out
    assert "800 tokens" in captured.err and "retrieved=" in captured.err  # the per-length progress bar
    result = json.loads((out / "passkey.json").read_text())
    assert [r["length"] for r in result["comet"]] == [200, 400, 800]
    for row in result["comet"]:
        assert set(row["accuracy_by_depth"]) == {"0.0", "0.5", "1.0"}
        assert row["peak_mem_mib"] > 0 and row["tokens_per_s"] > 0
        assert len(row["samples"]) == 3 and all(len(s["passkey"]) == 5 for s in row["samples"])
        # the figures are the samples' own: retrieved = the output starts with the key, averaged per depth
        for sample in row["samples"]:
            assert sample["correct"] == sample["output"].startswith(sample["passkey"])
            assert row["accuracy_by_depth"][str(sample["depth"])] == float(sample["correct"])  # one per depth
        assert row["accuracy"] == pytest.approx(mean(row["accuracy_by_depth"].values()))
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
    for row in result["rows"]:  # each row scored on what it shows; the totals are the rows' means
        assert row["f1"] == token_f1(row["prediction"], row["reference"])
        assert row["exact_match"] == float(normalize(row["prediction"]) == normalize(row["reference"]))
    assert result["f1"] == pytest.approx(mean(r["f1"] for r in result["rows"]))
    assert result["exact_match"] == pytest.approx(mean(r["exact_match"] for r in result["rows"]))


def test_qa_scores_of_known_predictions(base_dirs):
    """Two answerable rows with known continuations, one without labels and one without a prompt."""
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    key_prompt, key = encode("Question: what is the key? Answer:"), encode(" 12345")
    fruit_prompt, fruit = encode("Question: which fruit? Answer:"), encode(" the red apple")
    ignored = [-100]
    dataset = Dataset.from_dict({
        "input_ids": [key_prompt + key, fruit_prompt + fruit, encode("nothing to answer"), key],
        "labels": [ignored * len(key_prompt) + key, ignored * len(fruit_prompt) + fruit,
                   ignored * len(encode("nothing to answer")), key]})
    continuations = {tuple(key_prompt): " 12345 and more", tuple(fruit_prompt): " a red pear tree"}
    asked = []

    def continuation(prompts, n):
        asked.append(n)
        return [encode(continuations[tuple(prompt)]) for prompt in prompts]

    result = evaluate_qa(continuation, tokenizer, dataset)
    assert asked == [len(key) + 4, len(fruit) + 4]  # the answer's length and some slack
    # the prediction is cut to the reference's word count: "12345" against "12345" (exact), and
    # "a red pear" against "the red apple": without articles 1 of 2 words in common, F1 = 1/2
    assert [(r["index"], r["prediction"], r["exact_match"], r["f1"]) for r in result["rows"]] == [
        (0, "12345", 1.0, 1.0), (1, "a red pear", 0.0, 0.5)]
    assert (result["exact_match"], result["f1"], result["scored"], result["skipped"]) == (0.5, 0.75, 2, 2)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_passkey_accuracy_of_known_answers(base_dirs, batch_size):
    """Per depth, 2 samples: both retrieved at depth 0 (one running on after the key), one at depth
    0.5, none at depth 1 (a wrong first digit); the longer length is skipped without a call. In batches
    of 4 the 6 prompts of a length come as 4 and 2, and every answer still meets its own prompt."""
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    plan = iter(["key", "key and more", "key", "wrong", "wrong", "wrong"])
    asked = []

    def answer(prompt):
        key, planned = re.search(r"pass key is (\d{5})", tokenizer.decode(prompt)).group(1), next(plan)
        wrong = str(int(key[0]) % 9 + 1) + key[1:]
        text = {"key": key, "key and more": f"{key} and more", "wrong": wrong}[planned]
        return tokenizer(" " + text, add_special_tokens=False).input_ids

    def continuation(prompts, n):
        if "pass key" not in tokenizer.decode(prompts[0]):  # the warm-up call
            return [[]]
        asked.append((len(prompts), n))
        return [answer(prompt) for prompt in prompts]

    skip = {300: "too long for this test"}.get
    printed = []
    short, long = evaluate_passkey(continuation, tokenizer, [200, 300], [0.0, 0.5, 1.0], 2, seed=0, skip=skip,
                                   progress=printed.append, batch_size=batch_size)
    assert asked == {1: [(1, KEY_TOKENS)] * 6, 4: [(4, KEY_TOKENS), (2, KEY_TOKENS)]}[batch_size]
    assert short.accuracy_by_depth == {0.0: 1.0, 0.5: 0.5, 1.0: 0.0} and short.accuracy == 0.5
    assert [(s["depth"], s["correct"]) for s in short.samples] == [
        (0.0, True), (0.0, True), (0.5, True), (0.5, False), (1.0, False), (1.0, False)]
    assert [s["passkey"] for s in short.samples] == evaluation_keys([200], [0.0, 0.5, 1.0], 2, seed=0)
    assert short.skipped is None and long.skipped == "too long for this test"
    assert long.accuracy_by_depth == {} and math.isnan(long.accuracy)
    assert "accuracy  50.0%" in printed[0] and "skipped (too long for this test)" in printed[1]


def test_answer_normalisation_and_f1():
    assert normalize("The  Pass-key, is: 12345!") == "passkey is 12345"
    assert token_f1("the key is 12345", "12345") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("abc", "") == 0.0


def test_stage_losses_continue_the_step_count_across_stages(tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text('{"step": 25, "loss": 1.9}\n{"step": 50, "loss": 1.2}\n')
    second.write_text('{"step": 25, "loss": 0.5, "loss_mean": 0.7}\n\n{"step": 40, "loss": 0.1}\n'
                      '{"step": 40, "adapter": "a"}\n')
    assert stage_losses([first, second]) == [(25, 1.9), (50, 1.2), (75, 0.7), (90, 0.1)]  # the mean where logged
    loss_curves({"seed 0": [first, second]}, tmp_path / "curve.png", "two stages")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
