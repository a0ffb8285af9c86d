"""A tiny Llama-, Qwen3-, Qwen2- or Mistral-style base model and sentencepiece tokenizer, built locally.

Nothing is downloaded: the tokenizer is trained on a built-in synthetic corpus, the model is
initialised randomly and then pretrained briefly on the same corpus (a real, if small, language
model), and both are written with save_pretrained so every other part of comet_ds loads them
exactly as it would load a real base model.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from comet_ds.modeling import ARCHITECTURES
from comet_ds.schedule import warmup_schedule
from data_prep.errors import CometInputError
from data_prep.fs import file_sha256, output_directory

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a bird", "the teacher", "our team",
             "the farmer", "a child", "the river", "the city", "the garden", "a small boat", "the library"]
_VERBS = ["sees", "likes", "builds", "finds", "paints", "moves", "opens", "counts", "reads", "follows",
          "carries", "remembers", "watches", "cleans", "visits"]
_OBJECTS = ["the red house", "a green tree", "the blue sky", "an open door", "the long road", "a quiet room",
            "the bright sun", "a cold lake", "the tall tower", "a warm fire", "the first letter", "a silver key"]
_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


def synthetic_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Simple English-like sentences, numbers and passkey-style lines (fixed by the seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        kind = rng.random()
        if kind < 0.6:
            line = (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                    f"{rng.choice(['today', 'at night', 'in the morning', 'again', 'slowly', 'twice'])}.")
        elif kind < 0.8:
            line = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(1, 4)))
        elif kind < 0.9:  # a fact, some distraction, the question: in-context retrieval
            key = rng.randint(10000, 99999)
            line = (f"The pass key is {key}. Remember it. {key} is the pass key. "
                    + " ".join(rng.choice(_FILLER) for _ in range(rng.randint(0, 6)))
                    + f" What is the pass key? The pass key is {key}.")
        else:
            line = f"There are {rng.randint(0, 999)} items and {rng.randint(0, 99)} boxes, {rng.randint(1, 9)} each."
        lines.append(line)
    return lines


def train_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerBase:
    """A byte-fallback BPE sentencepiece model wrapped as a Hugging Face Llama tokenizer."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus(seed=seed)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(tmp, pad_token="<pad>")
        tokenizer.save_pretrained(tmp)  # reload through the saved form, as users will
        return AutoTokenizer.from_pretrained(tmp)


def tiny_model(arch: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 32768,
               seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    special = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=arch == "qwen3", **special)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def check_buildable(arch: str, *, pretrain: bool, hidden_size: int = 64, num_layers: int = 4,
                    num_heads: int = 4) -> None:
    """Refuse, before any work, a tiny base that cannot be built: attention heads of an even size (rotary
    embeddings pair the dimensions), and weights (plus gradients and AdamW's two moments when pretraining)
    that fit in the memory available. The size is counted on a meta-device copy: no memory is allocated."""
    import psutil

    from data_prep.errors import CometInputError

    if hidden_size % (2 * num_heads):
        raise CometInputError(f"hidden size {hidden_size}: give a multiple of {2 * num_heads} ({num_heads} attention "
                              "heads of an even size)")
    with torch.device("meta"):
        params = sum(p.numel() for p in tiny_model(arch, 1024, hidden_size=hidden_size, num_layers=num_layers,
                                                   num_heads=num_heads).parameters())
    needed, available = params * 4 * (4 if pretrain else 1), psutil.virtual_memory().available
    if needed > available:
        raise CometInputError(f"{num_layers} layers of hidden size {hidden_size}: {needed / 2**30:,.1f} GiB of fp32 "
                              f"weights{' and optimizer state' if pretrain else ''}, over the "
                              f"{available / 2**30:,.1f} GiB available; choose a smaller model")


PRETRAINING_SUMMARY = "pretraining.json"
EARLY_LOSSES = 5  # first step losses kept in the summary: a rebuild checks its start against them


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, steps: int, *, seq_len: int = 256,
             batch_size: int = 16, lr: float = 3e-3, seed: int = 0, progress: bool = True,
             stop_after: int | None = None) -> dict:
    """Next-token training on the packed synthetic corpus (AdamW, warmup then cosine); returns a summary.

    stop_after: run only the first steps of the `steps`-step schedule, enough to check that a recorded
    pretraining run starts as it did without paying for all of it."""
    lines = min(200_000, max(4000, steps * batch_size * seq_len // 12))  # ~12 tokens a line; windows are sampled
    text = " ".join(synthetic_corpus(num_lines=lines, seed=seed + 1))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(max(1, steps // 20), steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    bar = tqdm(range(min(steps, stop_after or steps)), desc="pretraining the tiny base", unit="step",
               disable=not progress)
    for _ in bar:
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "tokens": steps * batch_size * seq_len, "first_loss": losses[0],
            "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start,
            "early_losses": losses[:EARLY_LOSSES]}


# A tiny Llama base pretrained past the point where it copies a key back in context, so a passkey
# fine-tune starts from that skill instead of spending its time on it. build.json records the command
# that rebuilds it, the environment it ran in and every file's sha256.
SHIPPED_BASE = "tiny_llama"
BUILD_RECORD = "build.json"


def shipped_base_record() -> dict:
    return json.loads((files(__package__) / SHIPPED_BASE / BUILD_RECORD).read_text(encoding="utf-8"))


def install_shipped_base(out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the shipped tiny base to `out` (new or empty, or with `overwrite` an earlier init-base output),
    each file checked against its recorded sha256 before `out` appears."""
    source, record = files(__package__) / SHIPPED_BASE, shipped_base_record()
    with output_directory(out, "comet-ds init-base", overwrite=overwrite) as scratch:
        for name, digest in {**record["sha256"], BUILD_RECORD: None}.items():
            target = scratch / name
            target.write_bytes((source / name).read_bytes())
            if digest is not None and file_sha256(target) != digest:
                raise CometInputError(f"the shipped tiny base's {name} does not match its recorded sha256: the "
                                      "installed package is damaged; reinstall comet_ds")
    return Path(out)


def pretraining_line(base: Path) -> str | None:
    """One line on how the tiny base in `base` was pretrained; None when it was left at random weights."""
    path = base / PRETRAINING_SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return (f"    pretrained {summary['steps']} steps ({summary['tokens']:,} tokens): loss "
            f"{summary['first_loss']:.2f} -> {summary['final_loss']:.2f} in {summary['seconds']:.0f} s")


def init_base(out: str | Path, arch: str = "llama", *, seed: int = 0, pretrain_steps: int = 0,
              progress: bool = True, overwrite: bool = False, **model_kwargs: int) -> Path:
    """Write a tiny base model and its tokenizer to `out` (save_pretrained format), pretrained for
    `pretrain_steps` steps on the built-in corpus (0: left at its random initialisation).

    `out` must be new or empty, or (with `overwrite`) an earlier init-base output; it appears whole.
    """
    out = Path(out)
    with output_directory(out, "comet-ds init-base", overwrite=overwrite) as scratch:
        tokenizer = train_tokenizer(seed=seed)
        model = tiny_model(arch, len(tokenizer), seed=seed, tokenizer=tokenizer, **model_kwargs)
        if pretrain_steps > 0:
            summary = pretrain(model, tokenizer, pretrain_steps, seed=seed, progress=progress)
            (scratch / PRETRAINING_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return out
