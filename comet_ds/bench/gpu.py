"""CoMeT against Hugging Face full attention on one device, at real model shapes with random weights.

`comet-ds bench gpu` builds a Qwen3-shaped base locally (nothing is downloaded: the weights are random,
which leaves speed and memory as they are) and measures, within a time budget:
  * kernels: which sdpa kernel runs for a CoMeT chunk (no mask, and with a boolean mask), for the additive
    float mask chunks used before, and for Hugging Face's full attention; and the chunk's attention alone
    under each of the three formulations, forward and forward + backward;
  * prefill: streaming prefill (`StreamingGenerator.prefill`) tokens/s and peak memory at each length,
    and Hugging Face's own forward with a KV cache at the same lengths until it runs out of memory or
    time (a skipped length gets an extrapolation, labelled as one); decode latency per token after the
    longest prefill of each;
  * training: one LoRA step with activation checkpointing, full backprop through the memories at one
    length and `bptt_window` chunks per backward at a longer one, against Hugging Face LoRA fine-tuning
    with gradient checkpointing. Plain torch AdamW drives both: the step is the model's, not DeepSpeed's,
    so the command runs where DeepSpeed is not installed.

Results go to `results.json` in --out after every measurement (a run cut short keeps what it measured),
and the plots `prefill.png` and `training.png` at the end. The `tiny` shape runs the same code on a CPU
in seconds.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from comet_ds.config import CometConfig, CometInputError, CometTokens
from comet_ds.infer.generate import Decoding, SamplingSettings, StreamingGenerator
from comet_ds.layout import Chunk, ChunkLayout
from comet_ds.modeling.layer import allowed_keys, chunk_attention_mask
from comet_ds.modeling.memory import detach_state
from comet_ds.modeling.model import CometForCausalLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

T = TypeVar("T")

# the paper's memory settings
PAPER_COMET = CometConfig(chunk_size=2048, global_slots=512, temp_stride=8, temp_budget=2048)


@dataclass(frozen=True)
class Shape:
    """A Qwen3 decoder's shape and the CoMeT settings it is measured with."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    comet: CometConfig

    def hf_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.for_model(
            "qwen3", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            max_position_embeddings=40_960, rope_theta=1_000_000.0, tie_word_embeddings=True)


SHAPES = {
    "qwen3-0.6b": Shape(1024, 28, 16, 8, 128, 3072, 151_936, PAPER_COMET),
    "qwen3-4b": Shape(2560, 36, 32, 8, 128, 9728, 151_936, PAPER_COMET),
    # the same code at a size a CPU runs in seconds
    "tiny": Shape(64, 2, 4, 2, 16, 128, 1024, CometConfig(chunk_size=64, global_slots=8, temp_stride=8,
                                                          temp_budget=64)),
}


@dataclass(frozen=True)
class BenchSettings:
    shape: str = "qwen3-0.6b"
    layers: int | None = None  # fewer decoder layers than the shape's: its kernels and per-layer costs, quickly
    lengths: tuple[int, ...] = (32_768, 131_072, 524_288, 1_048_576)
    decode_tokens: int = 32
    train_full: int = 32_768  # full backprop through the memories
    train_windowed: int = 131_072
    bptt_window: int = 8
    baseline_train_lengths: tuple[int, ...] = (4096, 32_768)
    training: bool = True
    budget_s: float = 540.0
    device: str = "cuda"
    dtype: str = "bfloat16"
    repeats: int = 5  # timed calls of the attention-alone measurement

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise CometInputError(f"unknown shape {self.shape!r}: choose one of {', '.join(SHAPES)}")
        if not self.lengths:
            raise CometInputError("give at least one prefill length")
        object.__setattr__(self, "lengths", tuple(sorted(self.lengths)))
        object.__setattr__(self, "baseline_train_lengths", tuple(sorted(self.baseline_train_lengths)))
        chunks = math.ceil(self.train_windowed / SHAPES[self.shape].comet.chunk_size)
        if self.training and chunks <= self.bptt_window:
            raise CometInputError(f"--train-windowed {self.train_windowed} tokens are {chunks} chunks, no more than "
                                  f"one --bptt-window of {self.bptt_window}: give a longer length or a smaller window")
        if self.decode_tokens < 2:
            raise CometInputError(f"--decode-tokens must be >= 2 (got {self.decode_tokens}): the first new token "
                                  "comes from the prefill's logits, the others are timed")


# -- pieces ------------------------------------------------------------------------------------------------


def bench_tokens(shape: Shape) -> CometTokens:
    """CoMeT's inserted tokens at the top of the vocabulary, where a real tokenizer leaves unused rows."""
    top = shape.vocab_size - 1
    slots = shape.comet.global_slots
    return CometTokens(placeholder_id=top, temp_beacon_id=top - 1,
                       global_beacon_ids=tuple(range(top - 1 - slots, top - 1)), pad_id=0)


def text_ids(shape: Shape, length: int, seed: int = 0) -> list[int]:
    """Random text: ids below the inserted tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.vocab_size - shape.comet.global_slots - 2, (length,), generator=g).tolist()


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> CometForCausalLM:
    """A CoMeT model on a freshly initialised (random) Qwen3 base of `shape`, built on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        backbone = AutoModelForCausalLM.from_config(shape.hf_config(), dtype=dtype, attn_implementation="sdpa")
        model = CometForCausalLM(backbone, shape.comet, bench_tokens(shape))
    return model.to(device).eval()


def add_lora(model: CometForCausalLM, hf_only: bool = False) -> None:
    """LoRA (rank 8 on every projection) as `comet-ds train` sets it up; with `hf_only`, the base alone
    trains its adapters (the full-attention baseline), else the memories and inserted rows train too."""
    from peft import inject_adapter_in_model

    from comet_ds.modeling.finetune import FinetuneSettings, apply_finetune

    if hf_only:
        inject_adapter_in_model(FinetuneSettings().lora_config(), model.backbone)
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name
    else:
        apply_finetune(model, FinetuneSettings())


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device: str) -> None:
    """Hand freed memory back, so that the next peak starts from what is really held."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    from comet_ds.resources import reset_peak_memory

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_memory()


def peak_mib(device: str) -> float:
    """Peak memory since reset_peak: allocated on a GPU; the process's resident memory on a CPU."""
    from comet_ds.resources import peak_rss_mib

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def measure(device: str, run: Callable[[], T]) -> tuple[T, float, float]:
    """(result, seconds, peak MiB) of one call, the device synchronised on both sides."""
    release(device)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    result = run()
    sync(device)
    return result, time.perf_counter() - start, peak_mib(device)


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# the aten operators behind F.scaled_dot_product_attention, by the kernel they stand for
SDPA_OPERATORS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (other backend)",
}


def sdpa_kernels(run: Callable[[], object]) -> list[str]:
    """The sdpa kernels that `run` dispatched to, read from the profiler's operator records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    names = {event.name for event in prof.events()}
    return sorted({label for op, label in SDPA_OPERATORS.items() if op in names})


def additive_chunk_mask(roles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's mask as the additive float tensor chunks used before chunk_attention_mask (0 where a
    token may attend, the dtype's minimum elsewhere); kept here only to time it side by side."""
    allowed = allowed_keys(roles)
    return torch.zeros(allowed.shape, dtype=dtype, device=roles.device).masked_fill(~allowed, torch.finfo(dtype).min)


def probe_chunks(shape: Shape) -> tuple[Chunk, Chunk]:
    """Two full-length chunks of the same shape: one that runs without a mask (the steady state of a
    stream) and one that needs the boolean mask (a 1-token chunk before it leaves empty queue slots)."""
    cfg = shape.comet
    steady_index = max(1, math.ceil(cfg.queue_capacity / max(1, cfg.beacons_per_chunk)))
    layout = ChunkLayout(cfg, bench_tokens(shape))
    steady = layout.layout([text_ids(shape, cfg.chunk_size * (steady_index + 1))])[steady_index]
    masked = layout.layout([text_ids(shape, 2 * cfg.chunk_size + 1)], text_chunk_sizes=[[cfg.chunk_size, 1,
                                                                                         cfg.chunk_size]])[2]
    assert chunk_attention_mask(steady.roles) is None and chunk_attention_mask(masked.roles) is not None
    return steady, masked


class StepTimes:
    """Time stamps of decoding steps. The median is the steady per-token latency; the mean also carries
    CoMeT's chunk roll-over (every chunk_size tokens, the beacons run and the next chunk's memory slots
    fill), which a few dozen timed tokens over-represent; the slowest step is that roll-over."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def summary(self) -> dict[str, float]:
        steps = sorted(1000 * (b - a) for a, b in zip(self.stamps, self.stamps[1:]))
        return {"steps": len(steps), "ms_per_token_median": round(steps[len(steps) // 2], 3),
                "ms_per_token_mean": round(sum(steps) / len(steps), 3), "ms_slowest_step": round(steps[-1], 3)}


class Budget:
    """Seconds left for measuring; a measurement predicted to overrun them is skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, predicted_s: float | None) -> bool:
        return self.left() > 0 and (predicted_s is None or predicted_s <= self.left())


def predicted_seconds(previous: dict | None, tokens: int, power: int) -> float | None:
    """A run's time scaled from the last one that ran: linear (power 1) for CoMeT, quadratic (power 2, the
    attention's share at long lengths) for full attention."""
    if previous is None or "seconds" not in previous:
        return None
    return previous["seconds"] * (tokens / previous["tokens"]) ** power


# -- the measurements ----------------------------------------------------------------------------------------


@dataclass
class Results:
    out: Path
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, row: dict[str, Any]) -> dict[str, Any]:
        self.data.setdefault(section, []).append(row)
        self.write()
        print(f"  {section}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        return row

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")


def rounded(seconds: float, tokens: int, peak: float) -> dict[str, float]:
    return {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1), "peak_memory_mib": round(peak, 1)}


def measure_kernels(model: CometForCausalLM, shape: Shape, settings: BenchSettings, results: Results) -> None:
    """Which sdpa kernel each formulation of the chunk's attention runs, and its time alone at the chunk's
    shape (one decoder layer's attention module, Hugging Face's own sdpa call)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device, dtype = settings.device, model.embedding.new_rows.dtype
    attention = model.layers[0].decoder_layer.self_attn
    steady, masked = (chunk.to(device) for chunk in probe_chunks(shape))
    length = steady.roles.shape[-1]
    g = torch.Generator(device=device).manual_seed(0)

    def qkv() -> list[torch.Tensor]:
        return [torch.randn(1, heads, length, shape.head_dim, generator=g, device=device, dtype=dtype)
                .requires_grad_() for heads in (shape.heads, shape.kv_heads, shape.kv_heads)]

    formulations = {
        "no mask (causal), a stream's chunk": (steady.roles, None),
        "boolean mask, a chunk after a short one": (masked.roles, chunk_attention_mask(masked.roles)),
        "boolean mask, a stream's chunk": (steady.roles, allowed_keys(steady.roles)),
        "additive float mask (before), a stream's chunk": (steady.roles, additive_chunk_mask(steady.roles, dtype)),
    }
    for name, (_, mask) in formulations.items():
        q, k, v = qkv()

        def forward(q=q, k=k, v=v, mask=mask) -> torch.Tensor:
            return sdpa_attention_forward(attention, q, k, v, mask, scaling=attention.scaling)[0]

        def forward_backward(forward=forward) -> None:
            forward().sum().backward()

        row = {"case": name, "tokens": length, "kernels": sdpa_kernels(forward)}
        for label, run in (("forward", forward), ("forward_backward", forward_backward)):
            with torch.no_grad() if label == "forward" else torch.enable_grad():
                run()  # warm-up
                _, seconds, _ = measure(device, lambda run=run: [run() for _ in range(settings.repeats)])
            row[f"{label}_ms"] = round(1000 * seconds / settings.repeats, 3)
            row[f"{label}_tokens_per_s"] = round(length * settings.repeats / seconds, 1)
        results.add("attention", row)
    ids = torch.tensor([text_ids(shape, min(4096, settings.lengths[0]))], device=device)
    with torch.inference_mode():
        results.add("attention", {"case": f"Hugging Face full attention, {ids.shape[1]} tokens",
                                  "tokens": ids.shape[1],
                                  "kernels": sdpa_kernels(lambda: model.backbone(input_ids=ids, logits_to_keep=1))})


def measure_prefill(model: CometForCausalLM, shape: Shape, settings: BenchSettings, budget: Budget,
                    results: Results) -> None:
    """Streaming prefill at each length, then decoding after the longest; the same for full attention."""
    with torch.inference_mode():  # warm-up: first-call allocations and kernel choices
        model.backbone(input_ids=torch.tensor([text_ids(shape, 256)], device=settings.device), logits_to_keep=1)
    measure_comet_prefill(model, shape, settings, budget, results)
    release(settings.device)
    measure_full_attention_prefill(model.backbone, shape, settings, budget, results)


def measure_comet_prefill(model: CometForCausalLM, shape: Shape, settings: BenchSettings, budget: Budget,
                          results: Results) -> None:
    device = settings.device
    generator = StreamingGenerator(model)
    decode = SamplingSettings(max_new_tokens=settings.decode_tokens)
    generator.decode(generator.prefill(text_ids(shape, 2 * shape.comet.chunk_size + 3)), decode)  # warm-up
    last: dict | None = None
    decoding: Decoding | None = None
    for tokens in settings.lengths:
        if not budget.allows(predicted_seconds(last, tokens, 1)):
            results.add("prefill", {"system": "comet", "tokens": tokens, "status": "skipped: over the time budget"})
            continue
        decoding = None  # the last prefill's memories are freed before the next one's peak is counted
        ids = text_ids(shape, tokens)
        decoding, seconds, peak = measure(device, lambda ids=ids: generator.prefill(ids))
        last = results.add("prefill", {"system": "comet", "tokens": tokens, **rounded(seconds, tokens, peak)})
    if decoding is not None:
        stamps = StepTimes()
        generator.decode(decoding, decode, on_token=lambda _token: stamps.mark())  # picking a token syncs
        results.add("decode", {"system": "comet", "after_tokens": last["tokens"], **stamps.summary()})


def measure_full_attention_prefill(backbone: PreTrainedModel, shape: Shape, settings: BenchSettings, budget: Budget,
                                   results: Results) -> None:
    """Hugging Face's forward over the whole prompt with a KV cache (what a prefill for decoding is),
    the last token's logits only; lengths after the first out-of-memory are not tried."""
    device = settings.device
    last: dict | None = None  # the last length that ran
    failed = False
    cache, next_token = None, None
    for tokens in settings.lengths:
        row = {"system": "full attention", "tokens": tokens}
        if failed:
            results.add("prefill", {**row, "status": "not tried: a shorter length ran out of memory"})
            continue
        predicted = predicted_seconds(last, tokens, 2)
        if not budget.allows(predicted):
            if predicted is not None:
                row["extrapolated_tokens_per_s"] = round(tokens / predicted, 1)
                row["extrapolated_from"] = f"{last['tokens']} tokens, the time growing as the length squared"
            results.add("prefill", {**row, "status": "skipped: over the time budget"})
            continue
        cache = next_token = None
        release(device)
        ids = torch.tensor([text_ids(shape, tokens)], device=device)
        try:
            with torch.inference_mode():
                out, seconds, peak = measure(device, lambda ids=ids: backbone(input_ids=ids, use_cache=True,
                                                                              logits_to_keep=1))
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            del err
            failed = True
            release(device)
            results.add("prefill", {**row, "status": "out of memory"})
            continue
        cache, next_token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        last = results.add("prefill", {**row, **rounded(seconds, tokens, peak)})
    if cache is not None:
        ran = last["tokens"]

        stamps = StepTimes()
        token = next_token
        with torch.inference_mode():
            stamps.mark()
            for _ in range(settings.decode_tokens - 1):
                step = backbone(input_ids=token, past_key_values=cache, use_cache=True)
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                stamps.mark()
        results.add("decode", {"system": "full attention", "after_tokens": ran, **stamps.summary()})


def windowed_train_step(model: CometForCausalLM, chunks: list[Chunk], optimizer: torch.optim.Optimizer,
                        bptt_window: int | None) -> float:
    """One optimizer step on one laid-out sequence, backward once per `bptt_window` chunks (once in all
    without one), so that only a window's activations are held: the gradients of
    `model(chunks, bptt_window=...)` followed by one backward, in bounded memory. Returns the loss."""
    scale = 1.0 / max(1, sum(c.num_labels for c in chunks))
    step = bptt_window or len(chunks)
    states, total = None, 0.0
    for start in range(0, len(chunks), step):
        out = model(chunks[start:start + step], states=states)
        (out.loss_sum * scale).backward()
        total += out.loss_sum.item() * scale
        states = [detach_state(s) for s in out.states]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def full_attention_train_step(backbone: PreTrainedModel, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    loss = backbone(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def measure_training(shape: Shape, settings: BenchSettings, dtype: torch.dtype, budget: Budget,
                     results: Results) -> None:
    """One training step of each setting; each system on a fresh model, freed before the next."""
    measure_comet_training(shape, settings, dtype, budget, results)
    release(settings.device)
    measure_full_attention_training(shape, settings, dtype, budget, results)
    release(settings.device)


def measure_comet_training(shape: Shape, settings: BenchSettings, dtype: torch.dtype, budget: Budget,
                           results: Results) -> None:
    device = settings.device
    model = build_model(shape, device, dtype)
    add_lora(model)
    for layer in model.layers:
        layer.activation_checkpointing = True
    model.train()
    optimizer = optimizer_for(model)
    layout = ChunkLayout(shape.comet, model.tokens)
    warm = layout.layout([text_ids(shape, 2 * shape.comet.chunk_size)])
    windowed_train_step(model, warm, optimizer, None)  # warm-up: optimizer state, first-call allocations
    last: dict | None = None
    for tokens, window in ((settings.train_full, None), (settings.train_windowed, settings.bptt_window)):
        row = {"system": "comet", "tokens": tokens, "bptt_window": window or "full"}
        if not budget.allows(predicted_seconds(last, tokens, 1)):
            results.add("training", {**row, "status": "skipped: over the time budget"})
            continue
        chunks = layout.layout([text_ids(shape, tokens)])  # laid out before the clock: data loading
        try:
            _, seconds, peak = measure(device, lambda c=chunks, w=window: windowed_train_step(model, c, optimizer, w))
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            results.add("training", {**row, "status": "out of memory"})
            continue
        last = results.add("training", {**row, **rounded(seconds, tokens, peak)})


def measure_full_attention_training(shape: Shape, settings: BenchSettings, dtype: torch.dtype, budget: Budget,
                                    results: Results) -> None:
    device = settings.device
    holder = build_model(shape, device, dtype)
    add_lora(holder, hf_only=True)
    backbone = holder.backbone
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.train()
    optimizer = optimizer_for(backbone)
    full_attention_train_step(backbone, torch.tensor([text_ids(shape, 256)], device=device), optimizer)  # warm-up
    last: dict | None = None
    for tokens in settings.baseline_train_lengths:
        row = {"system": "full attention", "tokens": tokens, "bptt_window": "-"}
        if last is not None and last.get("status") == "out of memory":
            results.add("training", {**row, "status": "not tried: a shorter length ran out of memory"})
            continue
        if not budget.allows(predicted_seconds(last, tokens, 2)):
            results.add("training", {**row, "status": "skipped: over the time budget"})
            continue
        ids = torch.tensor([text_ids(shape, tokens)], device=device)
        try:
            _, seconds, peak = measure(device, lambda ids=ids: full_attention_train_step(backbone, ids, optimizer))
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            last = results.add("training", {**row, "status": "out of memory"})
            continue
        last = results.add("training", {**row, **rounded(seconds, tokens, peak)})


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratios from the rows: per length, CoMeT's prefill speed over full attention's (measured or
    extrapolated, said which) and CoMeT's peak memory over its own at 128k (or its shortest length); CoMeT's
    training speed with full backprop over full attention's at its shortest length, and its peak memory over
    full attention's at the same length."""
    prefill = data.get("prefill", [])
    comet = {r["tokens"]: r for r in prefill if r["system"] == "comet" and "seconds" in r}
    full = {r["tokens"]: r for r in prefill if r["system"] == "full attention"}
    reference = 131_072 if 131_072 in comet else min(comet, default=None)
    rows = []
    for tokens, row in sorted(comet.items()):
        other = full.get(tokens, {})
        speed = other.get("tokens_per_s") or other.get("extrapolated_tokens_per_s")
        rows.append({
            "tokens": tokens,
            "comet_over_full_attention_speed": round(row["tokens_per_s"] / speed, 2) if speed else None,
            "full_attention": "measured" if "tokens_per_s" in other else other.get("status", "not run"),
            "comet_memory_over_full_attention": (round(row["peak_memory_mib"] / other["peak_memory_mib"], 3)
                                                 if "peak_memory_mib" in other else None),
            f"comet_memory_over_comet_at_{reference}": round(
                row["peak_memory_mib"] / comet[reference]["peak_memory_mib"], 3)})
    summary: dict[str, Any] = {"prefill": rows}
    training = [r for r in data.get("training", []) if "seconds" in r]
    ours = [r for r in training if r["system"] == "comet" and r["bptt_window"] == "full"]
    theirs = {r["tokens"]: r for r in training if r["system"] == "full attention"}
    if ours and theirs:
        shortest = theirs[min(theirs)]
        summary[f"comet_training_speed_at_{ours[0]['tokens']}_over_full_attention_at_{shortest['tokens']}"] = round(
            ours[0]["tokens_per_s"] / shortest["tokens_per_s"], 3)
        if ours[0]["tokens"] in theirs:
            summary[f"comet_training_memory_over_full_attention_at_{ours[0]['tokens']}"] = round(
                ours[0]["peak_memory_mib"] / theirs[ours[0]["tokens"]]["peak_memory_mib"], 3)
    return summary


def plot(data: dict[str, Any], out: Path) -> None:
    """tokens/s and peak memory against length, both systems: prefill.png and training.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for section, name in (("prefill", "prefill.png"), ("training", "training.png")):
        rows = data.get(section, [])
        if not rows:
            continue
        figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
        for system, colour in (("comet", "tab:blue"), ("full attention", "tab:red")):
            ran = [r for r in rows if r["system"] == system and "seconds" in r]
            guessed = [r for r in rows if r["system"] == system and "extrapolated_tokens_per_s" in r]
            if ran:
                xs = [r["tokens"] for r in ran]
                speed.plot(xs, [r["tokens_per_s"] for r in ran], "o-", color=colour, label=system)
                memory.plot(xs, [r["peak_memory_mib"] / 1024 for r in ran], "o-", color=colour, label=system)
                for r in ran:
                    if section == "training":
                        speed.annotate(f"bptt {r['bptt_window']}", (r["tokens"], r["tokens_per_s"]), fontsize=7)
            if guessed:
                speed.plot([r["tokens"] for r in guessed], [r["extrapolated_tokens_per_s"] for r in guessed], "x:",
                           color=colour, label=f"{system} (extrapolated)")
        speed.set_yscale("log")  # full attention's speed falls by orders of magnitude; memory is read as flat or not
        memory.set_ylim(bottom=0)
        for axis, label in ((speed, "tokens/s"), (memory, "peak memory (GiB)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("tokens")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
        machine = data.get("machine", {})
        figure.suptitle(f"{section}: {data.get('shape', '')} on {machine.get('device_name', '')}, "
                        f"{machine.get('dtype', '')}")
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)


def machine_info(settings: BenchSettings) -> dict[str, Any]:
    import transformers

    device = torch.device(settings.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None  # looked up, not imported
    return {"device": settings.device, "device_name": name, "dtype": settings.dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "deepspeed_installed": has_deepspeed,
            "cpu_threads": torch.get_num_threads()}


def run_bench(settings: BenchSettings, out: Path) -> dict[str, Any]:
    """Every measurement that fits the time budget, written to `out` as it goes; returns the results."""
    budget = Budget(settings.budget_s)
    shape = SHAPES[settings.shape]
    if settings.layers:
        shape = replace(shape, layers=settings.layers)
    dtype = getattr(torch, settings.dtype)
    results = Results(out, {"settings": asdict(settings), "shape": settings.shape, "shape_config": asdict(shape),
                            "machine": machine_info(settings),
                            "notes": ["random weights built locally; nothing downloaded",
                                      "training: plain torch AdamW (no DeepSpeed), LoRA rank 8, activation "
                                      "checkpointing; sequences laid out before the clock starts",
                                      "peak memory: allocated on a GPU; the process's peak RSS on a CPU"]})
    results.write()
    model = build_model(shape, settings.device, dtype)
    print(f"kernels ({budget.left():.0f} s left)", flush=True)
    measure_kernels(model, shape, settings, results)
    print(f"prefill and decode ({budget.left():.0f} s left)", flush=True)
    measure_prefill(model, shape, settings, budget, results)
    del model
    release(settings.device)
    if settings.training:
        print(f"training ({budget.left():.0f} s left)", flush=True)
        measure_training(shape, settings, dtype, budget, results)
    results.data["summary"] = summarise(results.data)
    results.write()
    plot(results.data, out)
    return results.data
