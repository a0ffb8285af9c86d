"""The run config: one YAML file (plus key=value overrides) that says everything about a training run.

The DeepSpeed JSON it names says how the run is laid out on the hardware (pipeline stages, ZeRO
stage, precision); the run config owns everything about the optimisation, so no setting lives in
two places.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comet_ds.config import CometConfig, CometConfigError, _known_fields
from comet_ds.modeling.finetune import FinetuneSettings

# DeepSpeed keys the run config sets from its own values.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.sequences_per_step",
    "train_micro_batch_size_per_gpu": "train.sequences_per_step",
    "gradient_accumulation_steps": "train.sequences_per_step",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr and train.weight_decay",
    "scheduler": "train.warmup_steps",
}


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    sequences_per_step: int = 1  # per data-parallel replica
    max_tokens: int | None = None  # truncate longer sequences
    group_by_length: bool = False  # each step's sequences share one length (no padding to the longest)
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.5
    seed: int = 0
    activation_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "sequences_per_step", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise CometConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise CometConfigError(f"train.lr must be > 0 (got {self.lr})")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise CometConfigError("train.warmup_steps, train.grad_clip and train.weight_decay must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CometConfigError(f"train.max_tokens must be >= 2 or null (got {self.max_tokens})")


@dataclass(frozen=True)
class PipelineSettings:
    partition: str = "layers"  # layers | parameters | uniform
    bptt_window: int | None = None  # chunks per backprop window; None = the whole sequence

    def __post_init__(self) -> None:
        if self.partition not in ("layers", "parameters", "uniform"):
            raise CometConfigError(f"pipeline.partition must be layers, parameters or uniform (got {self.partition!r})")
        if self.bptt_window is not None and self.bptt_window < 1:
            raise CometConfigError(f"pipeline.bptt_window must be >= 1 or null (got {self.bptt_window})")


@dataclass(frozen=True)
class TrackingSettings:
    experiment: str = "comet_ds"
    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db
    run_name: str | None = None


@dataclass(frozen=True)
class RunConfig:
    base_model: str
    dataset: str
    output_dir: str
    deepspeed_config: str
    comet: CometConfig = field(default_factory=CometConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    # a CoMeT model directory (an earlier run's adapter) whose weights this run starts from instead of
    # freshly initialised memories: the next stage of a curriculum, or more training on new data
    init_from: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        values = dict(_known_fields(cls, values, "run"))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise CometConfigError(f"the run config needs {', '.join(missing)}")
        sections = {"comet": CometConfig, "finetune": FinetuneSettings, "pipeline": PipelineSettings,
                    "train": TrainSettings, "tracking": TrackingSettings}
        for name, section in sections.items():
            given = values.get(name) or {}
            if not isinstance(given, dict):
                raise CometConfigError(f"{name} must be a mapping of settings (got {given!r})")
            values[name] = section(**_known_fields(section, given, name))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def deepspeed_dict(self) -> dict[str, Any]:
        """The DeepSpeed config with the values the run config owns filled in."""
        path = Path(self.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist (see ds_configs/ for examples)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CometConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
        for key, owner in OWNED_DEEPSPEED_KEYS.items():
            if key in config:
                raise CometConfigError(f"{path} sets {key!r}; remove it and set {owner} in the run config")
        zero = config.get("zero_optimization", {}).get("stage", 0)
        if zero > 1:
            raise CometConfigError(f"{path}: ZeRO stage {zero} does not combine with pipeline parallelism; use 0 or 1")
        if zero == 0 and self.train.grad_clip > 0:
            raise CometConfigError(
                f"{path}: with ZeRO stage 0 DeepSpeed's pipeline clips by the first stage's gradient norm only; "
                "use zero_optimization.stage 1, or set train.grad_clip to 0")
        return {**config, "train_micro_batch_size_per_gpu": self.train.sequences_per_step,
                "gradient_accumulation_steps": 1, "gradient_clipping": self.train.grad_clip,
                "steps_per_print": config.get("steps_per_print", 10**9)}

    def pipeline_stages(self) -> int:
        stages = self.deepspeed_dict().get("pipeline", {}).get("stages", 1)
        if not isinstance(stages, int) or stages < 1:
            raise CometConfigError(f"{self.deepspeed_config}: pipeline.stages must be a positive integer "
                                   f"(got {stages!r})")
        return stages


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CometConfigError(f"override {text!r} is not key=value (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted key=value overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CometConfigError(f"run config {path} is not valid YAML: {err}") from None
    for override in overrides:
        keys, value = parse_override(override)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise CometConfigError(f"override {override!r}: {key!r} is not a section")
        target[keys[-1]] = value
    return RunConfig.from_dict(values)
