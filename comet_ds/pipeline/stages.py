"""The CoMeT model as a DeepSpeed PipelineModule: one pipeline layer per decoder layer.

Pipeline layers (`pipeline_layer_order`): token embedding, inserted-token rows, one layer per
decoder layer, final norm, loss. Activations crossing stages: (hidden [B, L, H] float, roles [B, L]
long, labels [B, L] long). Roles rebuild the chunk's masks, positions and memory indices on every
stage; labels ride along to the head. Each layer keeps its own memory state between chunks: the
memory a chunk receives is a detached leaf, and a `MemoryBridge` on the layer output hands the
gradient that the next chunk left on that leaf back into this chunk's graph, so backwards in reverse
order inside each block of the step's `StepPlan` give exactly the gradients of backpropagation through
time cut at the block boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from comet_ds.modeling.layer import ChunkContext, CometLayer
from comet_ds.modeling.memory import MemoryState, detach_state
from comet_ds.modeling.model import CometForCausalLM, labelled_loss_sum, vocabulary_mask
from comet_ds.modeling.tokens import CometEmbedding, replace_inserted_rows
from comet_ds.pipeline import PARTITION_METHODS
from comet_ds.pipeline.schedule import StepPlan

StageActivations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ChunkContexts(nn.Module):
    """Builds each chunk's context once per stage; every layer of the stage shares this module."""

    def __init__(self, rotary_embedding: nn.Module, dtype: torch.dtype, queue_capacity: int):
        super().__init__()
        self.rotary_embedding = rotary_embedding
        self.dtype = dtype
        self.queue_capacity = queue_capacity
        self._roles: torch.Tensor | None = None
        self._context: ChunkContext | None = None

    def get(self, roles: torch.Tensor) -> ChunkContext:
        if roles is not self._roles:  # the same tensor object travels through a stage's layers
            self._context = ChunkContext.build(roles, self.rotary_embedding, self.dtype, self.queue_capacity)
            self._roles = roles
        return self._context


class MemoryBridge(torch.autograd.Function):
    """Identity on the layer output; in backward, also feeds the next chunk's memory gradient to
    the memory this chunk produced."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, owner: CometLayerPipe, chunk: int, *state: torch.Tensor) -> torch.Tensor:
        ctx.owner, ctx.chunk, ctx.states = owner, chunk, len(state)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, None, None, *ctx.owner.take_memory_grads(ctx.chunk, ctx.states))


def _tensors(state: MemoryState) -> list[torch.Tensor]:
    return [x for x in state if x is not None]


class CometLayerPipe(nn.Module):
    """One CoMeT layer as a pipeline layer, carrying its memory across the chunks of a sequence."""

    def __init__(self, layer: CometLayer, contexts: ChunkContexts):
        super().__init__()
        self.layer = layer
        self.contexts = contexts
        self.start_step(None)

    def start_step(self, plan: StepPlan | None) -> None:
        """Start a step's micro-batches (None: one sequence, never cut): no memory, no pending gradients."""
        self._plan = plan or StepPlan(0)
        self._chunk = 0  # the next forward's micro-batch
        self._state: MemoryState | None = None
        self._leaves: dict[int, MemoryState] = {}
        self._awaiting_backward: dict[int, list[int]] = {}  # block -> its forwarded chunks without backward

    def forward(self, inputs: StageActivations) -> StageActivations:
        hidden, roles, labels = inputs
        chunk, self._chunk = self._chunk, self._chunk + 1
        if chunk in self._plan.sequence_starts:
            self._state = None
        state = self._incoming_state(chunk)
        out, self._state = self.layer(hidden, self.contexts.get(roles), state)
        if torch.is_grad_enabled():
            self._awaiting_backward.setdefault(self._plan.block_of(chunk), []).append(chunk)
            out = MemoryBridge.apply(out, self, chunk, *_tensors(self._state))
        return out.contiguous(), roles, labels

    def _incoming_state(self, chunk: int) -> MemoryState | None:
        state = detach_state(self._state)
        if state is None or self._plan.starts_block(chunk) or not torch.is_grad_enabled():
            return state
        leaves = MemoryState(*(None if x is None else x.requires_grad_() for x in state))
        self._leaves[chunk] = leaves
        return leaves

    def take_memory_grads(self, chunk: int, states: int) -> list[torch.Tensor | None]:
        """Gradients the backward of chunk+1 left on the `states` memory tensors chunk produced (None where
        chunk+1 took none: a cut, or the last chunk of a sequence)."""
        block = self._plan.block_of(chunk)
        pending = self._awaiting_backward.get(block, [])
        expected = pending[-1] if pending else None
        if chunk != expected:
            raise RuntimeError(
                f"CoMeT memory gradients must flow backward in reverse chunk order within a BPTT window: backward "
                f"of chunk {chunk} arrived while chunk {expected} was next in its window; the pipeline schedule "
                "must run each window's backwards from its last chunk to its first")
        pending.pop()
        if not pending:
            del self._awaiting_backward[block]
        leaves = self._leaves.pop(chunk + 1, None)
        if leaves is None:
            return [None] * states
        return [x.grad for x in _tensors(leaves)]


class TokenEmbeddingPipe(nn.Module):
    """Token embedding lookup (first stage). With tied weights the same module computes the loss on
    the last stage, through `loss`, and DeepSpeed keeps the two copies of the matrix in step."""

    def __init__(self, embed_tokens: nn.Embedding, loss_excluded_ids: tuple[int, ...]):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.register_buffer("loss_excluded", vocabulary_mask(embed_tokens.num_embeddings, loss_excluded_ids),
                             persistent=False)

    def forward(self, inputs: StageActivations) -> tuple[torch.Tensor, ...]:
        input_ids, roles, labels = inputs
        return self.embed_tokens(input_ids), roles, labels, input_ids

    def loss(self, inputs: StageActivations) -> torch.Tensor:
        normed, _, labels = inputs
        return labelled_loss_sum(normed, labels, self.embed_tokens.weight, self.loss_excluded)[0]


class InsertedRowsPipe(nn.Module):
    """Puts the trainable rows of the inserted tokens in place (first stage)."""

    def __init__(self, embedding: CometEmbedding):
        super().__init__()
        self.new_rows = embedding.new_rows
        self.register_buffer("row_of_id", embedding.row_of_id, persistent=False)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> StageActivations:
        hidden, roles, labels, input_ids = inputs
        return replace_inserted_rows(hidden, input_ids, self.new_rows, self.row_of_id), roles, labels


class FinalNormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs: StageActivations) -> StageActivations:
        hidden, roles, labels = inputs
        return self.norm(hidden), roles, labels


class LMHeadLossPipe(nn.Module):
    """The chunk's summed cross-entropy (untied head; the loss function scales it)."""

    def __init__(self, lm_head: nn.Linear, loss_excluded_ids: tuple[int, ...]):
        super().__init__()
        self.lm_head = lm_head
        self.register_buffer("loss_excluded", vocabulary_mask(lm_head.out_features, loss_excluded_ids),
                             persistent=False)

    def forward(self, inputs: StageActivations) -> torch.Tensor:
        normed, _, labels = inputs
        return labelled_loss_sum(normed, labels, self.lm_head.weight, self.loss_excluded)[0]


def _tied_loss(module: TokenEmbeddingPipe, inputs: StageActivations) -> torch.Tensor:
    return module.loss(inputs)


def scaled_loss(chunk_loss_sum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The pipeline loss function: summed CE of the chunk times the step's normalisation."""
    return chunk_loss_sum * scale


T = TypeVar("T")


def pipeline_layer_order(embedding: T, inserted_rows: T, decoder_layers: Sequence[T], final_norm: T,
                         loss: T) -> list[T]:
    """The pipeline's layers in order, whatever stands for each: the modules the stages run, or the names and
    weights with which `comet-ds train --dry-run` previews how DeepSpeed splits them into stages."""
    return [embedding, inserted_rows, *decoder_layers, final_norm, loss]


class CometPipelineModule(PipelineModule):
    def start_step(self, plan: StepPlan | None) -> None:
        """Start a step's sequence groups on every layer of this stage (None: forget the last step's)."""
        for module in self.modules():
            if isinstance(module, CometLayerPipe):
                module.start_step(plan)


def build_pipeline_module(model: CometForCausalLM, num_stages: int, *, partition: str = "layers",
                          topology: object | None = None) -> CometPipelineModule:
    """Split a CoMeT model into `num_stages` stages: embedding, one layer per decoder layer, head."""
    if partition not in PARTITION_METHODS:
        raise ValueError(f"partition must be one of {', '.join(PARTITION_METHODS)} (got {partition!r})")
    num_layers = len(model.layers)
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages for {num_layers} decoder layers: use at most "
                         f"{num_layers} stages")
    contexts = ChunkContexts(model.rotary_emb, model.embedding.new_rows.dtype, model.config.queue_capacity)
    layers: list[nn.Module | LayerSpec] = [CometLayerPipe(layer, contexts) for layer in model.layers]
    embed_tokens, lm_head = model.embedding.base, model.head.lm_head
    loss_excluded = model.tokens.loss_excluded_ids(model.config)
    if lm_head.weight is embed_tokens.weight:
        first = TiedLayerSpec("embed_tokens", TokenEmbeddingPipe, embed_tokens, loss_excluded,
                              tied_weight_attr=["embed_tokens.weight"])
        loss = TiedLayerSpec("embed_tokens", TokenEmbeddingPipe, embed_tokens, loss_excluded, forward_fn=_tied_loss,
                             tied_weight_attr=["embed_tokens.weight"])
    else:
        first, loss = TokenEmbeddingPipe(embed_tokens, loss_excluded), LMHeadLossPipe(lm_head, loss_excluded)
    layers = pipeline_layer_order(first, InsertedRowsPipe(model.embedding), layers, FinalNormPipe(model.head.norm),
                                  loss)
    kwargs = {"topology": topology} if topology is not None else {"num_stages": num_stages}
    return CometPipelineModule(layers=layers, loss_fn=scaled_loss,
                               partition_method=PARTITION_METHODS[partition], **kwargs)
