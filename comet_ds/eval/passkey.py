"""Passkey retrieval by length and depth: accuracy, speed and peak memory, for CoMeT or full attention.

Every cell (length, depth) holds `samples` prompts built by data_prep's passkey generator; a sample
counts as retrieved when the greedy continuation starts with the key's digits. Peak memory is reset
before each length, so each length's figure is its own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
from comet_ds.layout import IGNORE_INDEX
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.resources import memory_in_use_mib, peak_memory_mib, reset_peak_memory
from data_prep.passkey import PASSKEY_RANGE, draw_key, passkey_sample
from data_prep.tokens import TextEncoder

KEY_TOKENS = 8  # greedy tokens generated per prompt: a 5-digit key and some slack


@dataclass
class LengthResult:
    length: int
    accuracy_by_depth: dict[float, float]
    tokens_per_s: float
    seconds: float
    peak_mem_mib: float
    peak_growth_mib: float = float("nan")  # peak over the memory in use when the length started
    skipped: str | None = None
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        values = list(self.accuracy_by_depth.values())
        return sum(values) / len(values) if values else float("nan")


# (prompts, n) -> each prompt's first n greedy tokens
Continuation = Callable[[list[list[int]], int], list[list[int]]]


def comet_continuation(model: CometForCausalLM) -> Continuation:
    """Streaming generation; the prompts' complete chunks are read as one batch."""
    generator = StreamingGenerator(model)

    def continuation(prompts: list[list[int]], n: int) -> list[list[int]]:
        settings = SamplingSettings(max_new_tokens=n)
        return [generator.decode(decoding, settings) for decoding in generator.prefill_batch(prompts)]

    return continuation


def full_attention_continuation(model: PreTrainedModel) -> Continuation:
    """The base model as it is: one forward over the whole prompt, KV cache for the new tokens; one prompt
    at a time (its attention scores, not its weights, are what a long prompt costs)."""

    @torch.inference_mode()
    def continuation(prompts: list[list[int]], n: int) -> list[list[int]]:
        new = []
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=model.config.pad_token_id or 0)
            new.append(out[0, len(prompt):].tolist())
        return new

    return continuation


def full_attention_fits(model: PreTrainedModel, length: int, budget_gib: float) -> str | None:
    """Why the full-attention baseline is skipped at `length`, or None if it runs."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length + KEY_TOKENS > limit:
        return f"beyond the base model's {limit} positions"
    scores_gib = config.num_attention_heads * length * length * 4 / 2**30  # one layer's attention scores
    if scores_gib * 3 > budget_gib:
        return f"attention scores alone need ~{scores_gib * 3:.1f} GiB (budget {budget_gib} GiB)"
    return None


def evaluation_keys(lengths: list[int], depths: list[float], samples: int, seed: int) -> list[str]:
    """The keys evaluate_passkey asks for with these settings, drawn as it draws them (one draw a sample),
    so that training data can hold them out."""
    keys = []
    for length in lengths:
        rng = random.Random(seed + length)
        keys += [draw_key(rng, *PASSKEY_RANGE) for _ in range(len(depths) * samples)]
    return keys


def evaluate_passkey(continuation: Continuation, tokenizer: PreTrainedTokenizerBase,
                     lengths: list[int], depths: list[float], samples: int, seed: int,
                     skip: Callable[[int], str | None] = lambda _: None,
                     progress: Callable[[str], None] = print, batch_size: int = 1) -> list[LengthResult]:
    """batch_size: prompts handed to `continuation` at once (peak memory grows with it)."""
    results, encoder = [], TextEncoder(tokenizer)
    continuation([encoder.encode("warm up")], 1)  # first-call allocations
    for length in lengths:
        reason = skip(length)
        if reason:
            progress(f"  {length:>9,} tokens: skipped ({reason})")
            results.append(LengthResult(length, {}, float("nan"), float("nan"), float("nan"), skipped=reason))
            continue
        rng = random.Random(seed + length)
        reset_peak_memory()
        in_use = memory_in_use_mib()
        begin, correct, rows, retrieved = time.perf_counter(), {}, [], 0
        # counted in tokens, not samples: one long prompt is a long wait, and tokens/s is the figure to watch
        bar = tqdm(total=length * len(depths) * samples, desc=f"{length:,} tokens", unit="tok", unit_scale=True,
                   leave=False, dynamic_ncols=True)
        cells = [depth for depth in depths for _ in range(samples)]
        for start in range(0, len(cells), batch_size):
            batch, prompts = cells[start:start + batch_size], []
            for depth in batch:
                sample = passkey_sample(encoder, length, depth, rng, with_text=False)
                answer_start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
                prompts.append((sample.input_ids[:answer_start], sample.passkey))
                del sample  # the prompts are the one thing here that grow with length: keep a single copy
            new_tokens = continuation([prompt for prompt, _ in prompts], KEY_TOKENS)
            for depth, (_, passkey), new in zip(batch, prompts, new_tokens, strict=True):
                answer = tokenizer.decode(new, skip_special_tokens=True).strip()
                hit = answer.startswith(passkey)
                retrieved += hit
                rows.append({"length": length, "depth": depth, "passkey": passkey, "output": answer,
                             "correct": hit})
            bar.set_postfix(retrieved=f"{retrieved}/{len(rows)}", refresh=False)
            bar.update(length * len(batch))
        for depth in depths:
            correct[depth] = sum(r["correct"] for r in rows if r["depth"] == depth) / samples
        seconds = time.perf_counter() - begin
        bar.close()
        peak = peak_memory_mib()
        result = LengthResult(length, correct, length * len(depths) * samples / seconds, seconds, peak,
                              peak - in_use, samples=rows)
        progress(f"  {length:>9,} tokens: accuracy {result.accuracy:6.1%}, {result.tokens_per_s:>8,.0f} tok/s, "
                 f"peak {result.peak_mem_mib:,.0f} MiB (+{result.peak_growth_mib:,.0f} MiB while running)")
        results.append(result)
    return results
