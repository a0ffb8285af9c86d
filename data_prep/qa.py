"""Long-context QA samples shared by every log source: questions with computed answers, a seeded
spread over the kinds of question, and the tokenised sample in which only the answer is trained."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str


def pick_questions(candidates: list[Question], per_sample: int, key: str, seed: int) -> list[Question]:
    """Up to `per_sample` questions taken round-robin over their kinds; the same for the same key and seed."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(key.encode()))
    by_kind: dict[str, list[Question]] = {}
    for q in candidates:
        by_kind.setdefault(q.kind, []).append(q)
    for pool in by_kind.values():
        rng.shuffle(pool)
    picked: list[Question] = []
    while len(picked) < per_sample and any(by_kind.values()):
        for pool in by_kind.values():
            if pool and len(picked) < per_sample:
                picked.append(pool.pop())
    return picked


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def qa_sample(tokenizer: PreTrainedTokenizerBase, context: str, question: Question) -> tuple[list[int], list[int]]:
    """Context, question and answer; only the answer's tokens are trained."""
    prompt = encode(tokenizer, f"{context}\nQuestion: {question.question}\nAnswer:")
    answer = encode(tokenizer, f" {question.answer}")
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
