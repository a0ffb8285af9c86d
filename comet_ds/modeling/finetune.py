"""What trains: LoRA on the attention and MLP projections (base frozen) or a full fine-tune.

Either way the memory networks and the rows of the inserted tokens train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, inject_adapter_in_model

from comet_ds.config import CometConfigError, _known_fields
from comet_ds.modeling.model import CometForCausalLM

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneSettings:
    """method: "lora" (base weights frozen) or "full" (every weight trains)."""

    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        targets = self.lora_targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise CometConfigError(f"finetune.lora_targets must be a list of module names like [q_proj, v_proj] "
                                   f"(got {self.lora_targets!r})")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.method not in ("lora", "full"):
            raise CometConfigError(f"finetune method must be 'lora' or 'full' (got {self.method!r})")
        if self.lora_rank < 1:
            raise CometConfigError(f"lora_rank must be >= 1 (got {self.lora_rank})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise CometConfigError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.method == "lora" and not self.lora_targets:
            raise CometConfigError("lora_targets is empty: name the projection modules LoRA adapts")

    def lora_config(self, base_model: str | None = None) -> LoraConfig:
        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_targets), task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneSettings:
        return cls(**_known_fields(cls, values, "finetune"))


def apply_finetune(model: CometForCausalLM, settings: FinetuneSettings, base_model: str | None = None) -> None:
    """Inject LoRA (if asked) into the backbone and set requires_grad for the chosen method."""
    if settings.method == "lora":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.backbone.named_modules()}
        unknown = [t for t in settings.lora_targets if t not in present]
        if unknown:
            raise CometConfigError(f"LoRA targets {unknown} are not modules of this base model")
        inject_adapter_in_model(settings.lora_config(base_model), model.backbone)
    for name, param in model.named_parameters():
        param.requires_grad = settings.method == "full" or "lora_" in name
    for param in [*model.memory_parameters(), model.embedding.new_rows]:
        param.requires_grad = True


def parameter_counts(model: CometForCausalLM) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "memory": sum(p.numel() for p in model.memory_parameters())}
