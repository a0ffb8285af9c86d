"""Experiment tracking: MLflow on one rank, plus a local metrics file that never goes missing.

Metrics always go to <output_dir>/metrics.jsonl. MLflow is tried as well: a sqlite store in the
output directory by default, or MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME. If MLflow cannot be
reached, training goes on: one warning, and the metrics file holds everything. A resumed run continues
the same MLflow run and logs each step once, in both places. A password in a tracking URI is never shown.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 500
URI_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/:@\s]*):[^/\s]*@")


def redact(text: str) -> str:
    """`text` with the password of every URI in it (scheme://user:password@host) replaced by ***."""
    return URI_PASSWORD.sub(r"\1:***@", text)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = redact(str(value))[:MAX_PARAM_LENGTH]
    return flat


class Tracker:
    """Logs params, metrics and artifacts; a no-op on every rank but the logging one."""

    def __init__(self, output_dir: str | Path, experiment: str, tracking_uri: str | None, run_name: str | None,
                 enabled: bool, resume_run_id: str | None = None, resume_step: int | None = None):
        """`resume_run_id`/`resume_step`: the MLflow run and the step a resumed run continues from."""
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.run_id: str | None = None
        self._mlflow = None
        self._mlflow_logged_through = 0  # steps up to this one are in the MLflow run already
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_metrics_after(resume_step)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or \
            f"sqlite:///{(self.output_dir / 'mlflow.db').absolute()}"
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
        self.tracking_uri = redact(uri)  # for messages; mlflow gets `uri`
        if self.tracking_uri != uri:  # mlflow prints run links made from the URI it is given, password and all
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # a tracking server that is down should cost seconds, not minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow

            user_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(uri)
            if user_uri is None:  # mlflow exports the URI; keep the user's environment as it was
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=(self.output_dir / "mlartifacts").absolute()
                                         .as_uri())
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name)
            self.run_id = run.info.run_id
            if resume_run_id is not None:
                client = mlflow.MlflowClient()
                self._mlflow_logged_through = max(
                    (m.step for key in run.data.metrics for m in client.get_metric_history(self.run_id, key)),
                    default=0)
            self._mlflow = mlflow
        except Exception as err:  # any tracking failure (bad URI, server down) must not stop training
            self._give_up(err)

    def _drop_metrics_after(self, step: int) -> None:
        """A resumed run logs the steps after its checkpoint again: drop their earlier lines (and a line cut
        short by a kill) so that the file holds each step once."""
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        scratch = self.metrics_file.with_name(f".{self.metrics_file.name}.tmp")
        scratch.write_text("".join(kept))
        os.replace(scratch, self.metrics_file)

    def _give_up(self, err: Exception) -> None:
        warnings.warn(redact(f"MLflow tracking at {self.tracking_uri} is unavailable ({type(err).__name__}: {err}); "
                             f"the run continues and metrics are kept in {self.metrics_file}"), stacklevel=3)
        self._mlflow = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._mlflow is None:
            return
        try:
            getattr(self._mlflow, method)(*args, **kwargs)
        except Exception as err:
            self._give_up(err)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            flat = flatten(params)
            for start in range(0, len(flat), 100):
                self._call("log_params", dict(list(flat.items())[start:start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if step > self._mlflow_logged_through:  # a resumed run's MLflow run holds earlier steps already
            self._call("log_metrics", dict(metrics), step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._call("log_artifacts", str(path), artifact_path)

    def log_artifact(self, path: str | Path) -> None:
        if self.enabled:
            self._call("log_artifact", str(path))

    def close(self, status: str = "FINISHED") -> None:
        self._call("end_run", status)
