"""Synthetic retrieval samples built offline at exact token lengths: the LongLoRA passkey protocol and
a RULER-style needle (a magic number for a named key among filler essays).

A sample is an instruction, repeated filler with one fact at a chosen depth, and a question whose
answer is the only trained span. Pieces are tokenised separately and concatenated, so lengths and
the answer position are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import cycle, islice

from data_prep.tokens import IGNORE_INDEX, Encoder

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "them. I will quiz you about the numbers afterwards.")
NEEDLE_FILLER = ("The city library opens early on weekdays. Rivers carry sand to the sea over many years. "
                 "A good map shows roads, rivers and the names of small towns.")
NEEDLE_FACT = "One of the special magic numbers for {word} is: {key}."
NEEDLE_QUESTION = "What is the special magic number for {word} mentioned in the provided text? The number is"
NEEDLE_WORDS = ("amber", "falcon", "harbor", "lantern", "meadow", "orchid", "quartz", "summit", "thistle", "willow")


@dataclass(frozen=True)
class PasskeySample:
    input_ids: list[int]
    labels: list[int]
    text: str
    passkey: str
    depth: float


def _hidden_fact(tokenizer: Encoder, length: int, depth: float, instruction: str, filler: str,
                 fact: str, question: str, answer: str, kind: str) -> tuple[list[int], list[int]]:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1] (got {depth})")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head, filler_ids, fact_ids = encode(instruction), encode(" " + filler), encode(" " + fact)
    question_ids, answer_ids = encode(" " + question), encode(" " + answer)
    budget = length - len(head) - len(fact_ids) - len(question_ids) - len(answer_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for a {kind} sample "
                         f"(needs at least {length - budget} tokens with this tokenizer)")
    cut = round(depth * budget)
    # built in place, one list each: at a million tokens every temporary copy costs 8 MB
    ids = list(head)
    ids.extend(islice(cycle(filler_ids), cut))
    ids.extend(fact_ids)
    ids.extend(islice(cycle(filler_ids), cut, budget))  # the haystack goes on where it was cut
    ids.extend(question_ids)
    ids.extend(answer_ids)
    labels = [IGNORE_INDEX] * (len(ids) - len(answer_ids))
    labels.extend(answer_ids)
    return ids, labels


PASSKEY_RANGE = (10000, 99999)  # 5-digit keys
NEEDLE_RANGE = (1_000_000, 9_999_999)  # 7-digit magic numbers
KEY_RANGES = {"passkey": PASSKEY_RANGE, "needle": NEEDLE_RANGE}


def draw_key(rng: random.Random, low: int, high: int, held_out: frozenset[str] = frozenset()) -> str:
    """A key drawn uniformly from [low, high], drawn again while it is one of `held_out` (an evaluation's keys,
    which training data must not contain). With nothing held out it takes exactly one draw from `rng`."""
    key = str(rng.randint(low, high))
    while key in held_out:
        key = str(rng.randint(low, high))
    return key


def passkey_sample(tokenizer: Encoder, length: int, depth: float, rng: random.Random, with_text: bool = True,
                   held_out: frozenset[str] = frozenset()) -> PasskeySample:
    """One sample of exactly `length` tokens with the passkey at `depth` (0 = start, 1 = end), never one of
    the `held_out` keys.

    with_text=False leaves `text` empty: decoding a million tokens costs more memory than the
    sample itself, and evaluation needs the ids alone.
    """
    key = draw_key(rng, *PASSKEY_RANGE, held_out)
    ids, labels = _hidden_fact(tokenizer, length, depth, INSTRUCTION, FILLER, NEEDLE.format(key=key), QUESTION, key,
                               "passkey")
    return PasskeySample(ids, labels, tokenizer.decode(ids) if with_text else "", key, depth)


def needle_sample(tokenizer: Encoder, length: int, depth: float, rng: random.Random,
                  held_out: frozenset[str] = frozenset()) -> PasskeySample:
    """RULER-style single needle: a 7-digit magic number for a named key, asked back by that name."""
    word = rng.choice(NEEDLE_WORDS)
    key = draw_key(rng, *NEEDLE_RANGE, held_out)
    ids, labels = _hidden_fact(tokenizer, length, depth, NEEDLE_INSTRUCTION, NEEDLE_FILLER,
                               NEEDLE_FACT.format(word=word, key=key), NEEDLE_QUESTION.format(word=word), key,
                               "needle")
    return PasskeySample(ids, labels, tokenizer.decode(ids), key, depth)


DepthSpec = float | tuple[float, float]


MAX_DEPTHS = 1000  # a count beyond this is a typo: every depth is a sample per length


def parse_depths(text: str) -> list[float]:
    """Depths as a count of evenly spaced ones ("5" → 0, .25, .5, .75, 1) or fractions ("0.1,0.5")."""
    if "," not in text and "." not in text:
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"depths {text!r}: give a count (5) or fractions (0.1,0.5)") from None
        if not 1 <= count <= MAX_DEPTHS:
            raise ValueError(f"the number of depths must be from 1 to {MAX_DEPTHS} (got {count})")
        return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]
    try:
        depths = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"depths {text!r}: give a count (5) or fractions (0.1,0.5)") from None
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be within [0, 1] (got {text})")
    return depths


def parse_depth_specs(text: str) -> list[DepthSpec]:
    """parse_depths, where an item may also be a range "lo-hi" that each sample draws its depth from.

    Ranges place the key anywhere in a stretch of the sequence (e.g. "in the second of four chunks":
    0.23-0.46) rather than at one token offset, so a model cannot learn the offset instead of the task.
    """
    if "-" not in text:
        return parse_depths(text)
    specs: list[DepthSpec] = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        try:
            bounds = float(low), float(high or low)
        except ValueError:
            raise ValueError(f"depth {item!r} is neither a fraction nor a range like 0.2-0.4") from None
        if not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise ValueError(f"depth range {item!r} must satisfy 0 <= lo <= hi <= 1")
        specs.append(bounds if high else bounds[0])
    return specs


def draw_depth(spec: DepthSpec, rng: random.Random) -> float:
    """The depth of one sample: the spec itself, or a uniform draw from its range."""
    return rng.uniform(*spec) if isinstance(spec, tuple) else spec
