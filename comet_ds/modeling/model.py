"""CoMeT on a Hugging Face decoder: the same layers, run chunk by chunk with per-layer memories."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from comet_ds.config import CheckpointMismatchError, CometConfig, CometTokens
from comet_ds.layout import IGNORE_INDEX, Chunk
from comet_ds.modeling.backbone import check_fits, decoder_parts
from comet_ds.modeling.layer import ChunkContext, CometLayer
from comet_ds.modeling.memory import LayerMemory, MemoryState, detach_state
from comet_ds.modeling.tokens import CometEmbedding


@dataclass
class CometOutput:
    loss: torch.Tensor  # summed CE over labelled tokens / labelled tokens (0 when none)
    loss_sum: torch.Tensor
    num_labels: int
    logits: list[torch.Tensor] | None  # per chunk [B, L, V], when asked for
    states: list[MemoryState | None]  # per layer, after the last chunk


def vocabulary_mask(vocab_size: int, token_ids: tuple[int, ...]) -> torch.Tensor:
    """True at `token_ids` (those the vocabulary has): entries never predicted, or left out of the loss."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[i for i in token_ids if i < vocab_size]] = True
    return mask


def labelled_loss_sum(normed: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                      excluded: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the labelled tokens of one chunk, the softmax leaving out the `excluded`
    vocabulary entries; the vocabulary projection runs on those rows only. A chunk without labels returns a
    zero that is still on the graph, so backward reaches (and carries memory gradients through) every chunk."""
    labelled = labels != IGNORE_INDEX
    count = int(labelled.sum())
    if count == 0:
        return normed.sum() * 0.0, 0
    logits = F.linear(normed[labelled], weight).masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits.float(), labels[labelled], reduction="sum"), count


class LMHead(nn.Module):
    """Final norm + LM head; inserted tokens are never predicted, and the loss's softmax leaves out
    `loss_excluded_ids` (CometConfig.loss_vocabulary)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, not_predicted_ids: tuple[int, ...],
                 loss_excluded_ids: tuple[int, ...]):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.register_buffer("not_predicted", vocabulary_mask(lm_head.out_features, not_predicted_ids),
                             persistent=False)
        self.register_buffer("loss_excluded", vocabulary_mask(lm_head.out_features, loss_excluded_ids),
                             persistent=False)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed).masked_fill(self.not_predicted, float("-inf"))

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        return labelled_loss_sum(self.norm(hidden), labels, self.lm_head.weight, self.loss_excluded)


class CometForCausalLM(nn.Module):
    """A decoder-only HF model reassembled as embedding → CoMeT layers → norm → head.

    The HF modules are shared, not copied: LoRA injected into the backbone shows up here, and the
    backbone can still be saved with save_pretrained.
    """

    def __init__(self, backbone: PreTrainedModel, config: CometConfig, tokens: CometTokens):
        super().__init__()
        tokens.check_against(config)
        check_fits(backbone, config)
        parts = decoder_parts(backbone)
        self.__dict__["backbone"] = backbone  # plain attribute: its parameters are registered below
        self.config = config
        self.tokens = tokens
        hf = backbone.config
        init_std = getattr(hf, "initializer_range", 0.02)
        self.embedding = CometEmbedding(parts.embed_tokens, tokens.inserted_ids)
        self.layers = nn.ModuleList(
            CometLayer(layer, LayerMemory(hf.hidden_size, config.bottleneck_rank, config.temp_enabled,
                                          init_std).to(backbone.dtype))
            for layer in parts.layers)
        self.head = LMHead(parts.norm, parts.lm_head, tokens.inserted_ids, tokens.loss_excluded_ids(config))
        self.rotary_emb = parts.rotary_emb

    # -- pieces shared by every forward path (and by pipeline stages) --------------------------

    @property
    def device(self) -> torch.device:
        return self.embedding.new_rows.device

    def chunk_context(self, chunk: Chunk) -> ChunkContext:
        return ChunkContext.build(chunk.roles, self.rotary_emb, self.embedding.new_rows.dtype,
                                  self.config.queue_capacity)

    # -- forward paths ---------------------------------------------------------------------------

    def forward(self, chunks: Iterable[Chunk], *, return_logits: bool = False,
                bptt_window: int | None = None, states: list[MemoryState | None] | None = None) -> CometOutput:
        """Chunk-major streaming: one chunk's activations plus the per-layer memory state at a time.

        Under torch.no_grad() memory is constant in sequence length; with gradients the graph of
        every chunk is kept (full backprop through the memories), or, with `bptt_window=k`, the
        memories are detached entering chunks k, 2k, ...: values flow on, gradients stop there.
        `states` are the memories the first chunk receives: a previous call's, to go on with its stream
        (default: none, a stream's start).
        """
        if states is not None and len(states) != len(self.layers):
            raise ValueError(f"{len(states)} memory states for {len(self.layers)} layers")
        states = [None] * len(self.layers) if states is None else list(states)
        loss_sum, count, all_logits = None, 0, [] if return_logits else None
        for chunk in chunks:
            chunk = chunk.to(self.device)  # layouts are built on the CPU
            if bptt_window and chunk.index > 0 and chunk.index % bptt_window == 0:
                states = [detach_state(s) for s in states]
            ctx = self.chunk_context(chunk)
            hidden = self.embedding(chunk.input_ids)
            for i, layer in enumerate(self.layers):
                hidden, states[i] = layer(hidden, ctx, states[i])
            part, n = self.head.loss_sum(hidden, chunk.labels)
            loss_sum, count = (part if loss_sum is None else loss_sum + part), count + n
            if all_logits is not None:
                all_logits.append(self.head.logits(self.head.norm(hidden)))
        return self._output(loss_sum, count, all_logits, states)

    def forward_reference(self, chunks: Iterable[Chunk], *, return_logits: bool = False) -> CometOutput:
        """Layer-major reference: every layer runs over all chunks before the next layer starts.

        Holds the activations of the whole sequence; it exists to check the other paths against.
        """
        chunks = [chunk.to(self.device) for chunk in chunks]
        contexts = [self.chunk_context(c) for c in chunks]
        hidden = [self.embedding(c.input_ids) for c in chunks]
        states: list[MemoryState | None] = []
        for layer in self.layers:
            state = None
            for t, ctx in enumerate(contexts):
                hidden[t], state = layer(hidden[t], ctx, state)
            states.append(state)
        loss_sum, count, all_logits = None, 0, [] if return_logits else None
        for h, chunk in zip(hidden, chunks):
            part, n = self.head.loss_sum(h, chunk.labels)
            loss_sum, count = (part if loss_sum is None else loss_sum + part), count + n
            if all_logits is not None:
                all_logits.append(self.head.logits(self.head.norm(h)))
        return self._output(loss_sum, count, all_logits, states)

    @staticmethod
    def _output(loss_sum: torch.Tensor | None, count: int, logits: list[torch.Tensor] | None,
                states: list[MemoryState | None]) -> CometOutput:
        if loss_sum is None:
            raise ValueError("no chunks to run")
        return CometOutput(loss=loss_sum / max(count, 1), loss_sum=loss_sum, num_labels=count, logits=logits,
                           states=states)

    # -- CoMeT's own weights ---------------------------------------------------------------------------

    def memory_parameters(self) -> list[nn.Parameter]:
        """The memory networks: they train at `memory_lr_multiplier` times the base LR."""
        return [p for layer in self.layers for p in layer.memory.parameters()]

    def comet_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights CoMeT adds to the base: memory networks and inserted-token rows."""
        state = {f"layers.{i}.memory.{name}": p for i, layer in enumerate(self.layers)
                 for name, p in layer.memory.named_parameters()}
        state["embedding.new_rows"] = self.embedding.new_rows
        return state

    @torch.no_grad()
    def load_comet_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy saved CoMeT weights in; any missing, extra or mis-shaped tensor is an error naming it."""
        own = self.comet_state_dict()
        hint = "(was it saved with another CoMeT config or base model?)"
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or extra:
            raise CheckpointMismatchError(
                f"{source} does not match this model: missing {missing[:3]}, unexpected {extra[:3]} {hint}")
        for name, param in own.items():
            if state[name].shape != param.shape:
                raise CheckpointMismatchError(f"{source}: {name} has shape {tuple(state[name].shape)}, this model "
                                              f"expects {tuple(param.shape)} {hint}")
            param.copy_(state[name])
