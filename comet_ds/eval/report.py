"""Evaluation outputs: a JSON file, plots a person would rather look at, and an MLflow run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # drawn without pyplot: no display or backend needed

from comet_ds.eval.passkey import LengthResult
from comet_ds.train.tracking import Tracker


def _rows(results: list[LengthResult]) -> list[dict]:
    return [{"length": r.length, "accuracy": r.accuracy, "accuracy_by_depth": r.accuracy_by_depth,
             "tokens_per_s": r.tokens_per_s, "seconds": r.seconds, "peak_mem_mib": r.peak_mem_mib,
             "peak_growth_mib": r.peak_growth_mib,
             "skipped": r.skipped, "samples": r.samples} for r in results]


def _length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def heatmap(results: list[LengthResult], path: Path, title: str) -> None:
    ran = [r for r in results if not r.skipped]
    depths = sorted({d for r in ran for d in r.accuracy_by_depth})
    grid = [[r.accuracy_by_depth.get(d, math.nan) for r in ran] for d in depths]
    fig = Figure(figsize=(1.1 * len(ran) + 2.5, 0.45 * len(depths) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(ran)), [_length_label(r.length) for r in ran])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cost_plot(series: dict[str, list[LengthResult]], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    mem, sec = fig.subplots(1, 2)
    for name, results in series.items():
        ran = [r for r in results if not r.skipped]
        mem.plot([r.length for r in ran], [r.peak_growth_mib for r in ran], marker="o", label=name)
        sec.plot([r.length for r in ran], [r.seconds for r in ran], marker="o", label=name)
    for ax, label in ((mem, "peak memory while running (MiB)"), (sec, "seconds per length")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CoMeT against full attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def stage_losses(metrics_files: list[Path]) -> list[tuple[int, float]]:
    """(step, training loss) over consecutive stages' metrics.jsonl files, steps counted from the first
    stage's start: the mean loss since the previous entry where the run logged one, else the step's own; an entry
    without a loss (a run's closing summary) is skipped."""
    points, offset = [], 0
    for path in metrics_files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        stage = [(offset + row["step"], row.get("loss_mean", row["loss"])) for row in rows
                 if "loss" in row and "step" in row]
        points += stage
        offset = stage[-1][0] if stage else offset
    return points


def loss_curves(runs: dict[str, list[Path]], path: Path, title: str) -> None:
    """One training-loss line per run, each run the metrics.jsonl files of its stages in order."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for name, files in runs.items():
        points = stage_losses(files)
        ax.plot([step for step, _ in points], [loss for _, loss in points], label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel("training loss (answer tokens, mean\nsince the last point)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_passkey_report(out: Path, comet: list[LengthResult], baseline: list[LengthResult] | None,
                         params: dict, experiment: str = "comet_ds-eval") -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "passkey.json", "heatmap": out / "passkey_heatmap.png"}
    payload = {"params": params, "comet": _rows(comet)}
    if baseline is not None:
        payload["full_attention"] = _rows(baseline)
        paths["cost"] = out / "passkey_cost.png"
        cost_plot({"CoMeT": comet, "full attention": baseline}, paths["cost"])
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    heatmap(comet, paths["heatmap"], "CoMeT passkey retrieval")
    tracker = Tracker(out, experiment, None, "passkey", enabled=True)
    tracker.log_params(params)
    for r in comet:
        if not r.skipped:
            tracker.log_metrics({"accuracy": r.accuracy, "tokens_per_s": r.tokens_per_s,
                                 "peak_mem_mib": r.peak_mem_mib, "peak_growth_mib": r.peak_growth_mib},
                                step=r.length)
    for r in baseline or []:
        if not r.skipped:
            tracker.log_metrics({"full_attention_accuracy": r.accuracy, "full_attention_peak_growth_mib":
                                 r.peak_growth_mib, "full_attention_seconds": r.seconds}, step=r.length)
    for path in paths.values():
        tracker.log_artifact(path)
    tracker.close()
    return {**{name: str(path) for name, path in paths.items()}, "mlflow": tracker.tracking_uri}


def write_qa_report(out: Path, result: dict, params: dict, experiment: str = "comet_ds-eval") -> dict[str, str]:
    """qa.json (scores and every scored row) and an MLflow run with the two scores."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "qa.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    tracker = Tracker(out, experiment, None, "qa", enabled=True)
    tracker.log_params(params)
    tracker.log_metrics({"exact_match": result["exact_match"], "f1": result["f1"]}, step=0)
    tracker.log_artifact(path)
    tracker.close()
    return {"json": str(path), "mlflow": tracker.tracking_uri}
