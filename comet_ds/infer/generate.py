"""Streaming generation: memories carried chunk to chunk, a KV cache for the current chunk only.

The prompt's complete chunks stream through the model as in training; the current chunk is fed with
a per-layer KV cache. Decoding inserts a temporary beacon after every `temp_stride` *text* tokens (the
training cadence) and, when the chunk holds `chunk_size` text tokens, rolls over: the trailing beacon
and the global beacons are fed, every layer's memories are updated from its beacon outputs, and a new
chunk starts from its memory slots. Generation length is therefore unbounded, in constant memory.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from comet_ds.config import CometConfigError
from comet_ds.layout import IGNORE_INDEX, ChunkIndices, ChunkLayout, fifo_keep
from comet_ds.modeling.backbone import cache_keyword
from comet_ds.modeling.memory import MemoryState
from comet_ds.modeling.model import CometForCausalLM


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def whole(value: object) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise CometConfigError(f"max_new_tokens must be a whole number >= 1 (got {self.max_new_tokens!r})")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise CometConfigError(f"temperature must be a finite number > 0 (got {self.temperature})")
        if not whole(self.top_k) or self.top_k < 0:
            raise CometConfigError(f"top_k must be a whole number >= 0, 0 for no limit (got {self.top_k!r})")
        if not 0 < self.top_p <= 1:  # NaN fails this too: it compares false both ways
            raise CometConfigError(f"top_p must be in (0, 1] (got {self.top_p})")


def pick_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Greedy, or temperature / top-k / top-p sampling, from one row of logits."""
    if not settings.do_sample:
        return int(logits.argmax())
    logits = logits.float() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > settings.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def cached_attention_mask(cached: int, steps: int, device: torch.device) -> torch.Tensor | None:
    """The mask of `steps` new tokens after `cached` tokens in the KV cache: None where sdpa needs none
    (one new token sees every key; an empty cache is plain causal attention), else a boolean
    [1, 1, steps, cached + steps] causal mask. Without a mask, Hugging Face's sdpa would crop the keys to
    the queries' length rather than offset the causal diagonal, so a mask is kept whenever both are there."""
    if steps == 1 or cached == 0:
        return None
    keys = torch.arange(cached + steps, device=device)
    return (keys[None, :] <= keys[cached:, None])[None, None]


class _Chunk:
    """The chunk being written: its KV cache, position and, per layer, the beacon outputs so far."""

    def __init__(self, model: CometForCausalLM, index: int):
        self.index = index
        self.cache = DynamicCache()
        self.length = 0  # tokens in the cache (all attended)
        self.text = 0  # text tokens
        self.temp_outputs: list[list[torch.Tensor]] = [[] for _ in model.layers]


@dataclass
class Decoding:
    """Where a prefilled prompt leaves generation: the current chunk, every layer's memories, and the
    logits after the prompt's last token."""

    chunk: _Chunk
    states: list[MemoryState | None]
    logits: torch.Tensor


def _row(state: MemoryState | None, row: int) -> MemoryState | None:
    """One sequence's memories out of a batch's."""
    if state is None:
        return None
    return MemoryState(*(None if x is None else x[row:row + 1] for x in state))


class StreamingGenerator:
    def __init__(self, model: CometForCausalLM):
        self.model = model.eval()
        self.config = model.config
        self.tokens = model.tokens
        self.device = model.device
        self.cache_keyword = cache_keyword(model.layers[0].decoder_layer)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> list[int]:
        """New token ids after `prompt_ids` (inserted beacons are not part of the result)."""
        return self.decode(self.prefill(prompt_ids), settings)

    def prefill(self, prompt_ids: list[int]) -> Decoding:
        """Read the prompt: its complete chunks stream through the model, the rest fills the current
        chunk's KV cache."""
        return self.prefill_batch([prompt_ids])[0]

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]]) -> list[Decoding]:
        """Read several prompts, as `prefill` reads one. Prompts with the same number of complete chunks
        stream them through the model as one batch (on a small model one row costs about as much as many,
        so this is where batching pays); each prompt then fills its own current chunk."""
        if not prompts or any(not prompt for prompt in prompts):
            raise ValueError("a prompt is empty" if prompts else "no prompts")
        size = self.config.chunk_size
        by_done_chunks: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_done_chunks.setdefault((len(prompt) - 1) // size, []).append(i)
        decodings: dict[int, Decoding] = {}
        layout = ChunkLayout(self.config, self.tokens)
        for done_chunks, members in by_done_chunks.items():
            states: list[MemoryState | None] = [None] * len(self.model.layers)
            if done_chunks:
                heads = [prompts[i][: done_chunks * size] for i in members]
                states = self.model(layout.iter_chunks(heads, [[IGNORE_INDEX] * len(h) for h in heads])).states
            for row, i in enumerate(members):
                states_of_prompt = [_row(state, row) for state in states]
                chunk = self._open(done_chunks, states_of_prompt)
                logits = self._feed_text(chunk, prompts[i][done_chunks * size:], states_of_prompt)
                decodings[i] = Decoding(chunk, states_of_prompt, logits)
        return [decodings[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def decode(self, decoding: Decoding, settings: SamplingSettings,
               on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids after a prefilled prompt; `decoding` is used up. `on_token` sees each new token as
        soon as it is picked (to stream it out, or to time the steps)."""
        chunk, states, logits = decoding.chunk, decoding.states, decoding.logits
        size = self.config.chunk_size
        generator = torch.Generator().manual_seed(settings.seed)
        out: list[int] = []
        while len(out) < settings.max_new_tokens:
            token = pick_token(logits, settings, generator)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in settings.stop_token_ids or len(out) == settings.max_new_tokens:
                break
            if chunk.text == size:
                states = self._close(chunk, states)
                chunk = self._open(chunk.index + 1, states)
            logits = self._feed_text(chunk, [token], states)
        return out

    # -- the current chunk ------------------------------------------------------------------------

    def _open(self, index: int, states: list[MemoryState | None]) -> _Chunk:
        """Start chunk `index`: fill its global and temporary slots with the carried memories."""
        chunk = _Chunk(self.model, index)
        if index == 0:
            return chunk
        slots = [self._slot_memory(state) for state in states]
        placeholders = torch.full((1, slots[0].shape[1]), self.tokens.placeholder_id, device=self.device)
        self._run(chunk, placeholders, replace_inputs=slots)
        return chunk

    @staticmethod
    def _slot_memory(state: MemoryState) -> torch.Tensor:
        parts = [state.global_memory] + ([state.temp_memory] if state.temp_memory is not None else [])
        return torch.cat(parts, dim=1)

    def _feed_text(self, chunk: _Chunk, text: list[int], states: list[MemoryState | None]) -> torch.Tensor:
        """Feed text tokens (a beacon after every temp_stride of them); logits after the last one."""
        ids, last_text = [], 0
        for token in text:
            ids.append(token)
            chunk.text += 1
            last_text = len(ids) - 1
            if self.config.temp_enabled and chunk.text % self.config.temp_stride == 0:
                ids.append(self.tokens.temp_beacon_id)
        hidden = self._run(chunk, torch.tensor([ids], device=self.device))
        # sampling runs on the CPU, where its torch.Generator lives
        return self.model.head.logits(self.model.head.norm(hidden[:, last_text]))[0].float().cpu()

    def _close(self, chunk: _Chunk, states: list[MemoryState | None]) -> list[MemoryState | None]:
        """Feed the trailing beacon and the global beacons; return every layer's updated memories."""
        cfg = self.config
        trailing = [self.tokens.temp_beacon_id] if cfg.temp_enabled and chunk.text % cfg.temp_stride else []
        ids = torch.tensor([[*trailing, *self.tokens.global_beacon_ids]], device=self.device)
        global_outputs = self._run(chunk, ids, keep_layer_outputs=True)
        new_states = []
        nb, g = cfg.beacons_per_chunk, cfg.global_slots
        for layer, state, temp_outputs, layer_out in zip(self.model.layers, states, chunk.temp_outputs,
                                                          global_outputs):
            out = torch.cat([*temp_outputs, layer_out[:, -g:]], dim=1)  # nb temp beacons, then G global
            queue = 0 if state is None or state.temp_memory is None else state.temp_memory.shape[1]
            none = torch.zeros(1, 0, dtype=torch.long, device=self.device)
            indices = ChunkIndices(
                global_slots=none, temp_slots=none, temp_beacons=torch.arange(nb, device=self.device)[None],
                global_beacons=(nb + torch.arange(g, device=self.device))[None],
                temp_keep=fifo_keep(torch.ones(1, queue + nb, dtype=torch.bool, device=self.device),
                                    cfg.queue_capacity))
            new_states.append(layer.next_state(out, indices, state))
        return new_states

    def _run(self, chunk: _Chunk, ids: torch.Tensor, replace_inputs: list[torch.Tensor] | None = None,
             keep_layer_outputs: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run new tokens of the chunk through every layer with the KV cache; record beacon outputs."""
        steps = ids.shape[1]
        positions = torch.arange(chunk.length, chunk.length + steps, device=self.device)[None]
        mask = cached_attention_mask(chunk.length, steps, self.device)
        hidden = self.model.embedding(ids)
        rope = self.model.rotary_emb(hidden, positions)
        is_beacon = (ids[0] == self.tokens.temp_beacon_id).nonzero()[:, 0]
        outputs = []
        for i, layer in enumerate(self.model.layers):
            if replace_inputs is not None:
                hidden = replace_inputs[i]
            hidden = layer.decoder_layer(hidden, attention_mask=mask, position_ids=positions,
                                         position_embeddings=rope, use_cache=True,
                                         **{self.cache_keyword: chunk.cache})
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if len(is_beacon) and self.config.temp_enabled:
                chunk.temp_outputs[i].append(hidden[:, is_beacon])
            if keep_layer_outputs:
                outputs.append(hidden)
        chunk.length += steps
        return outputs if keep_layer_outputs else hidden
