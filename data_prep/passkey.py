"""Synthetic passkey-retrieval samples (the LongLoRA protocol), built offline at exact token lengths.

A sample is an instruction, repeated filler sentences with one passkey line at a chosen depth, and a
question whose answer (the key's digits) is the only trained span. Pieces are tokenised separately
and concatenated, so lengths and the answer position are exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    input_ids: list[int]
    labels: list[int]
    text: str
    passkey: str
    depth: float


def passkey_sample(tokenizer: PreTrainedTokenizerBase, length: int, depth: float,
                   rng: random.Random) -> PasskeySample:
    """One sample of exactly `length` tokens with the passkey at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1] (got {depth})")
    key = str(rng.randint(10000, 99999))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    head, filler, needle = encode(INSTRUCTION), encode(" " + FILLER), encode(" " + NEEDLE.format(key=key))
    question, answer = encode(" " + QUESTION), encode(" " + key)
    budget = length - len(head) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"length {length} is too short for a passkey sample "
                         f"(needs at least {length - budget} tokens with this tokenizer)")
    haystack = (filler * (budget // len(filler) + 1))[:budget]
    cut = round(depth * budget)
    ids = head + haystack[:cut] + needle + haystack[cut:] + question + answer
    labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    return PasskeySample(ids, labels, tokenizer.decode(ids), key, depth)


def passkey_samples(tokenizer: PreTrainedTokenizerBase, lengths: list[int], depths: list[float],
                    per_cell: int, seed: int) -> Iterator[PasskeySample]:
    """`per_cell` samples for every (length, depth), reproducible from the seed."""
    rng = random.Random(seed)
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                yield passkey_sample(tokenizer, length, depth, rng)


def parse_depths(text: str) -> list[float]:
    """Depths as a count of evenly spaced ones ("5" → 0, .25, .5, .75, 1) or fractions ("0.1,0.5")."""
    if "," not in text and "." not in text:
        count = int(text)
        if count < 1:
            raise ValueError("the number of depths must be >= 1")
        return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]
    depths = [float(x) for x in text.split(",")]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be within [0, 1] (got {text})")
    return depths
