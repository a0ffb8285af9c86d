"""A tiny Llama-, Qwen3-, Qwen2- or Mistral-style base model and sentencepiece tokenizer, built locally in seconds.

Nothing is downloaded: the tokenizer is trained on a built-in synthetic corpus and the model is
randomly initialised, then both are written with save_pretrained so every other part of comet_ds
loads them exactly as it would load a real base model.
"""

from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}

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
        elif kind < 0.9:
            key = rng.randint(10000, 99999)
            line = f"The pass key is {key}. Remember it. {key} is the pass key."
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
    config_class, model_class = ARCHITECTURES[arch]
    special = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    config = config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=arch == "qwen3", **special)
    torch.manual_seed(seed)
    return model_class(config).float()


def init_base(out: str | Path, arch: str = "llama", *, seed: int = 0, **model_kwargs: int) -> Path:
    """Write a tiny base model and its tokenizer to `out` (save_pretrained format)."""
    out = Path(out)
    tokenizer = train_tokenizer(seed=seed)
    model = tiny_model(arch, len(tokenizer), seed=seed, tokenizer=tokenizer, **model_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
