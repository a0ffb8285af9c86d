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


def qa_text(context: str, question: Question) -> str:
    """The rendered sample: context, question, answer."""
    return f"{context}\nQuestion: {question.question}\nAnswer: {question.answer}"


def qa_samples(tokenizer: PreTrainedTokenizerBase, context: str,
               questions: list[Question]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per question: context, question and answer, only the answer's tokens trained.

    The context is tokenised once and shared by the questions (it is most of every sample); the
    question and the answer are tokenised as their own pieces.
    """
    context_ids = encode(tokenizer, context)
    samples = []
    for q in questions:
        prompt = context_ids + encode(tokenizer, f"\nQuestion: {q.question}\nAnswer:")
        answer = encode(tokenizer, f" {q.answer}")
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return samples
