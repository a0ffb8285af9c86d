"""Long-context QA samples shared by every log source: questions with computed answers, a seeded
spread over the kinds of question, and the tokenised sample in which only the answer is trained."""

from __future__ import annotations

import random
import zlib
from typing import NamedTuple

import numpy as np

from data_prep.tokens import TextEncoder

IGNORE_INDEX = -100


class Question(NamedTuple):  # a tuple: a history yields dozens of candidates, most never asked
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


def qa_text(context: str, question: Question) -> str:
    """The rendered sample: context, question, answer."""
    return f"{context}\nQuestion: {question.question}\nAnswer: {question.answer}"


def qa_samples(tokenizer: TextEncoder, context: str, questions: list[Question]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) per question: context, question and answer, only the answer's tokens trained.

    The context is tokenised once and shared by the questions (it is most of every sample); the
    question and the answer are tokenised as their own pieces, all in one batch.
    """
    pieces = [context]
    for q in questions:
        pieces += [f"\nQuestion: {q.question}\nAnswer:", f" {q.answer}"]
    context_ids, *encoded = (np.array(ids, dtype=np.int32) for ids in tokenizer.encode_batch(pieces))
    samples = []
    for question_ids, answer in zip(encoded[::2], encoded[1::2]):
        ids = np.concatenate([context_ids, question_ids, answer])
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        labels[len(ids) - len(answer):] = answer
        samples.append((ids, labels))
    return samples
