"""Long-context QA samples shared by every log source: questions with computed answers, a seeded
spread over the kinds of question, and the tokenised sample in which only the answer is trained."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from data_prep.tokens import IGNORE_INDEX, TextEncoder, int32_array

T = TypeVar("T")


class Question(NamedTuple):
    kind: str
    question: str
    answer: str


# kind → its questions, the kinds in the order they were first asked
QuestionPools = dict[str, Sequence[Question]]


class LazyPool(Sequence[Question]):
    """Questions built only when picked, from facts taken in sorted order (sorted when first needed):
    a history has dozens of candidates and is asked one or two."""

    def __init__(self, facts: Collection[T], build: Callable[[T], Question]):
        self._facts, self._build = facts, build
        self._ordered: list[T] | None = None

    def __len__(self) -> int:
        return len(self._facts)

    def __getitem__(self, index: int) -> Question:  # type: ignore[override]  # no slices
        if self._ordered is None:
            self._ordered = sorted(self._facts)
        return self._build(self._ordered[index])


def pools_by_kind(questions: Iterable[Question]) -> QuestionPools:
    pools: dict[str, list[Question]] = {}
    for q in questions:
        pools.setdefault(q.kind, []).append(q)
    return pools


def pick_questions(pools: QuestionPools, per_sample: int, key: str, seed: int) -> list[Question]:
    """Up to `per_sample` questions taken round-robin over their kinds, each kind's drawn at random;
    the same for the same key and seed. Only the picked questions are built."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(key.encode()))
    sizes = [len(pool) for pool in pools.values()]
    counts = [0] * len(sizes)
    while sum(counts) < per_sample and counts != sizes:  # one more of each kind left, in turn
        for kind, size in enumerate(sizes):
            if counts[kind] < size and sum(counts) < per_sample:
                counts[kind] += 1
    drawn = [rng.sample(range(size), count) for size, count in zip(sizes, counts)]
    return [pool[positions[turn]] for turn in range(max(counts, default=0))
            for pool, positions in zip(pools.values(), drawn) if turn < len(positions)]


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
    context_ids, *encoded = (int32_array(ids) for ids in tokenizer.encode_batch(pieces))
    samples = []
    for question_ids, answer in zip(encoded[::2], encoded[1::2]):
        ids = np.concatenate([context_ids, question_ids, answer])
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        labels[len(ids) - len(answer):] = answer
        samples.append((ids, labels))
    return samples
