"""The run config: one YAML file (plus key=value overrides) that says everything about a training run.

The DeepSpeed JSON it names says how the run is laid out on the hardware (pipeline stages, ZeRO
stage, precision); the run config owns everything about the optimisation, so no setting lives in
two places.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from comet_ds.config import CometConfig, CometConfigError, _known_fields
from comet_ds.configs import names_packaged_config, packaged_deepspeed_config, packaged_deepspeed_configs
from comet_ds.layout.plan import CHUNK_PLANS
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.pipeline import PARTITION_METHODS
from comet_ds.schedule import LR_SCHEDULES

if TYPE_CHECKING:  # importlib.resources.abc is new in Python 3.11
    from importlib.resources.abc import Traversable

# DeepSpeed keys the run config sets from its own values.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.sequences_per_step",
    "train_micro_batch_size_per_gpu": "train.sequences_per_step",
    "gradient_accumulation_steps": "train.accumulation_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr and train.weight_decay",
    "scheduler": "train.warmup_steps",
}


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    sequences_per_step: int = 1  # per data-parallel replica and accumulation group
    # sequence groups per optimizer step, each of sequences_per_step sequences; the pipeline overlaps one
    # group's backwards with the next one's forwards
    accumulation_steps: int = 1
    max_tokens: int | None = None  # truncate longer sequences
    group_by_length: bool = False  # each step's sequences share one length (no padding to the longest)
    # "fixed": full chunks and a remainder; "mixed": the paper's planner, a strategy drawn per sample (layout.plan)
    chunk_plan: str = "fixed"
    # consecutive rows packed into sequences of up to max_tokens tokens; memory flows from one document into the
    # next (as in the paper's training), or with reset_memory_per_document each document starts a chunk of its
    # own with empty memories, as if trained alone
    packing: bool = False
    reset_memory_per_document: bool = False
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # after the warmup: "cosine" to zero at the last step, or "constant"
    grad_clip: float = 1.5
    seed: int = 0
    activation_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    # consecutive steps with a non-finite loss or gradient norm before training stops with an error
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "sequences_per_step", "accumulation_steps", "log_every", "save_every",
                     "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise CometConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CometConfigError(f"train.lr must be a finite number > 0 (got {self.lr})")
        for name in ("grad_clip", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise CometConfigError(f"train.{name} must be a finite number >= 0 (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            raise CometConfigError(f"train.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise CometConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)} "
                                   f"(got {self.lr_schedule!r})")
        if self.chunk_plan not in CHUNK_PLANS:
            raise CometConfigError(f"train.chunk_plan must be one of {', '.join(CHUNK_PLANS)} "
                                   f"(got {self.chunk_plan!r})")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CometConfigError(f"train.max_tokens must be >= 2 or null (got {self.max_tokens})")
        if self.packing and self.max_tokens is None:
            raise CometConfigError("train.packing packs rows up to train.max_tokens tokens: set train.max_tokens")
        if self.reset_memory_per_document and not self.packing:
            raise CometConfigError("train.reset_memory_per_document applies to packed sequences: set train.packing")


@dataclass(frozen=True)
class PipelineSettings:
    partition: str = "layers"  # a name in PARTITION_METHODS
    bptt_window: int | None = None  # chunks per backprop window; None = the whole sequence

    def __post_init__(self) -> None:
        if self.partition not in PARTITION_METHODS:
            *names, last = PARTITION_METHODS
            raise CometConfigError(f"pipeline.partition must be {', '.join(names)} or {last} (got {self.partition!r})")
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
    deepspeed_config: str  # a .json file, or a packaged config's short name such as cpu_fp32_2stage
    comet: CometConfig = field(default_factory=CometConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    # a CoMeT model directory (an earlier run's adapter) whose weights this run starts from instead of
    # freshly initialised memories: the next stage of a curriculum, or more training on new data
    init_from: str | None = None
    # train on a comet-prep dataset whose manifest names another tokenizer than the base model's
    allow_tokenizer_mismatch: bool = False

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

    def deepspeed_file(self) -> Traversable:
        """The DeepSpeed config file deepspeed_config names: a packaged one by short name, or a path."""
        if names_packaged_config(self.deepspeed_config):
            return packaged_deepspeed_config(self.deepspeed_config)
        path = Path(self.deepspeed_config)
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"DeepSpeed config {str(path)!r} {problem}; give a .json file or name a "
                                    f"packaged one: {', '.join(packaged_deepspeed_configs())}")
        return path

    def deepspeed_dict(self) -> dict[str, Any]:
        """The DeepSpeed config with the values the run config owns filled in."""
        file, path = self.deepspeed_file(), self.deepspeed_config
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CometConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
        except UnicodeDecodeError:
            raise CometConfigError(f"DeepSpeed config {path} is not UTF-8 text") from None
        if not isinstance(config, dict):
            raise CometConfigError(f"DeepSpeed config {path} must be a JSON object ({{\"pipeline\": ...}}), "
                                   f"not {type(config).__name__} {config!r:.40}")
        for key, owner in OWNED_DEEPSPEED_KEYS.items():
            if key in config:
                raise CometConfigError(f"{path} sets {key!r}; remove it and set {owner} in the run config")
        _check_deepspeed_sections(config, path)
        zero = config.get("zero_optimization", {}).get("stage", 0)
        if zero > 1:
            raise CometConfigError(f"{path}: ZeRO stage {zero} does not combine with pipeline parallelism; use 0 or 1")
        if zero == 0 and self.train.grad_clip > 0:
            raise CometConfigError(
                f"{path}: with ZeRO stage 0 DeepSpeed's pipeline clips by the first stage's gradient norm only; "
                "use zero_optimization.stage 1, or set train.grad_clip to 0")
        # the engine's train_step runs the accumulation groups as micro-batches of one DeepSpeed batch, and
        # the loss scale already averages over all of them: DeepSpeed must not divide by its own count
        return {**config, "train_micro_batch_size_per_gpu": self.train.sequences_per_step,
                "gradient_accumulation_steps": 1, "gradient_clipping": self.train.grad_clip,
                "steps_per_print": config.get("steps_per_print", 10**9)}

    def pipeline_stages(self) -> int:
        return self.deepspeed_dict().get("pipeline", {}).get("stages", 1)

    def check_precision(self) -> None:
        """Refuse fp16/bf16 where torch sees no GPU: half precision is a GPU setting; the CPU path is fp32."""
        import torch

        if torch.cuda.is_available():
            return
        config = self.deepspeed_dict()
        for name in HALF_PRECISIONS:
            if config.get(name, {}).get("enabled", False):
                raise CometConfigError(
                    f"DeepSpeed config {self.deepspeed_config} enables {name}, which needs a GPU, and none is "
                    f"visible: on the CPU train in fp32 (set {name}.enabled to false, or use the packaged "
                    "deepspeed_config: cpu_fp32_2stage)")


# the DeepSpeed sections this tool reads, and the shape each must have
DEEPSPEED_SECTIONS = {"zero_optimization": '{"stage": 1}', "pipeline": '{"stages": 2}', "fp16": '{"enabled": false}',
                      "bf16": '{"enabled": false}', "bfloat16": '{"enabled": false}'}
HALF_PRECISIONS = ("fp16", "bf16", "bfloat16")  # DeepSpeed still reads "bfloat16" as bf16


def _check_deepspeed_sections(config: dict[str, Any], path: str) -> None:
    """The sections this tool reads have the types DeepSpeed expects: a string "1" or a bare 5 would
    otherwise fail deep inside DeepSpeed, or compare wrongly here."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name, example in DEEPSPEED_SECTIONS.items():
        if not isinstance(config.get(name, {}), dict):
            raise CometConfigError(f"DeepSpeed config {path}: {name} must be an object like {example} "
                                   f"(got {config[name]!r})")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if not whole(stage) or stage < 0:
        raise CometConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0 or 1 (got {stage!r})")
    stages = config.get("pipeline", {}).get("stages", 1)
    if not whole(stages) or stages < 1:
        raise CometConfigError(f"DeepSpeed config {path}: pipeline.stages must be a positive integer (got {stages!r})")
    for name in HALF_PRECISIONS:
        enabled = config.get(name, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise CometConfigError(f"DeepSpeed config {path}: {name}.enabled must be true or false (got {enabled!r})")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"the key {key!r} is given twice (line {line})")
        self.key, self.line = key, line


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, which PyYAML would silently resolve
    to the last value (a second `train:` section would drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges are meant to be overridden
            key = self.construct_object(key_node)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error as one line: PyYAML's own message spreads over several with a source excerpt."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return f"line {err.problem_mark.line + 1}: {' '.join(p for p in (err.context, err.problem) if p)}"
    return " ".join(str(err).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CometConfigError(f"override {text!r} is not key=value (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise CometConfigError(f"override {text!r}: the value is not valid YAML ({_one_line(err)})") from None
    return key.strip().split("."), value


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted key=value overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"run config {str(path)!r} {problem}: give the YAML file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise CometConfigError(f"run config {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except _DuplicateKey as err:
        raise CometConfigError(f"run config {path} repeats the key {err.key!r} (line {err.line}); give each "
                               "setting once (YAML would keep only the last)") from None
    except yaml.YAMLError as err:
        raise CometConfigError(f"run config {path} is not valid YAML: {_one_line(err)}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        got = "a list" if isinstance(values, list) else repr(values)
        raise CometConfigError(f"run config {path} must be a mapping of settings at the top level (got {got}); "
                               "see launch/examples/tiny_cpu.yaml")
    for override in overrides:
        keys, value = parse_override(override)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise CometConfigError(f"override {override!r}: {key!r} is not a section")
        target[keys[-1]] = value
    return RunConfig.from_dict(values)
