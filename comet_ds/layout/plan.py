"""Chunk plans: how many text tokens each chunk of a training sequence holds.

`fixed` cuts full chunks and one remainder, as generation does for a prompt. `mixed` draws one strategy per
sample, as the CoMeT paper's training does, so the model also sees short chunks before the last one (real
prompts and generation produce them): the strategies and their probabilities by length regime are those of
the paper's chunk planner. A plan has at most ceil(max_len / C) chunks (the paper's T), each of 1..C tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from comet_ds.layout.chunks import fixed_chunk_sizes

if TYPE_CHECKING:  # transformers loads only where a tokenizer is at hand
    from transformers import PreTrainedTokenizerBase

CHUNK_PLANS = ("fixed", "mixed")
MIN_CHUNK = 4  # the random and semantic strategies never cut a chunk shorter than this
# strategy → probability, by length regime of a sample of n text tokens (max_len: the longest a sample may be)
MIXTURE = {
    "short": {"fixed": 0.8, "right_aligned": 0.1, "random_sizes": 0.1},  # n < C
    "medium": {"fixed": 0.6, "right_aligned": 0.1, "random_sizes": 0.2, "uniform": 0.05,  # C <= n < 0.75 max_len
               "semantic": 0.05},
    "long": {"fixed": 0.6, "right_aligned": 0.1, "random_sizes": 0.1, "uniform": 0.2},  # n >= 0.75 max_len
}


def right_aligned_sizes(length: int, chunk_size: int) -> list[int]:
    """The remainder chunk first, then full chunks."""
    sizes = fixed_chunk_sizes(length, chunk_size)
    return sizes[-1:] + sizes[:-1]


def uniform_sizes(length: int, chunks: int) -> list[int]:
    """`chunks` chunks (at most one per token) whose sizes differ by at most one, the larger first."""
    chunks = min(chunks, length)
    size, extra = divmod(length, chunks)
    return [size + 1] * extra + [size] * (chunks - extra)


def random_sizes(length: int, chunk_size: int, max_chunks: int, rng: random.Random) -> list[int]:
    """A random number of chunks, from the fewest that can hold the tokens up to one per MIN_CHUNK tokens (at most
    max_chunks); each starts with MIN_CHUNK tokens (fewer for a tiny sequence), the rest go one by one to random
    chunks that are not yet full; the chunks are then shuffled."""
    fewest = math.ceil(length / chunk_size)
    chunks = rng.randint(fewest, max(fewest, min(length // MIN_CHUNK, max_chunks)))
    sizes = [min(MIN_CHUNK, length // chunks, chunk_size)] * chunks
    open_chunks = [i for i in range(chunks) if sizes[i] < chunk_size]
    for _ in range(length - sum(sizes)):
        k = rng.randrange(len(open_chunks))
        sizes[open_chunks[k]] += 1
        if sizes[open_chunks[k]] == chunk_size:
            open_chunks[k] = open_chunks[-1]
            open_chunks.pop()
    rng.shuffle(sizes)
    return sizes


def semantic_sizes(ids: Sequence[int], chunk_size: int, boundaries: frozenset[int]) -> list[int]:
    """Greedy cuts right after a boundary token (newline, sentence end, end of turn): each chunk ends at the last
    boundary that keeps it within chunk_size and at least MIN_CHUNK long and leaves nothing or at least MIN_CHUNK
    tokens after it; with no such boundary the chunk is full."""
    sizes, start, n = [], 0, len(ids)
    while start < n:
        end = min(start + chunk_size, n)
        if end < n:
            for cut in range(end, start + MIN_CHUNK - 1, -1):
                if ids[cut - 1] in boundaries and (n - cut == 0 or n - cut >= MIN_CHUNK):
                    end = cut
                    break
        sizes.append(end - start)
        start = end
    return sizes


def regime(length: int, chunk_size: int, max_len: int) -> str:
    if length < chunk_size:
        return "short"
    return "medium" if length < 0.75 * max_len else "long"


def plan_chunks(ids: Sequence[int], chunk_size: int, max_len: int, rng: random.Random,
                boundaries: frozenset[int]) -> list[int]:
    """One sample's chunk sizes under the mixed plan: a strategy drawn by the sample's length regime."""
    n, max_len = len(ids), max(max_len, len(ids))
    max_chunks = math.ceil(max_len / chunk_size)
    weights = MIXTURE[regime(n, chunk_size, max_len)]
    strategy = rng.choices(list(weights), list(weights.values()))[0]
    if strategy == "right_aligned":
        return right_aligned_sizes(n, chunk_size)
    if strategy == "random_sizes":
        return random_sizes(n, chunk_size, max_chunks, rng)
    if strategy == "uniform":
        return uniform_sizes(n, max_chunks)
    if strategy == "semantic":
        sizes = semantic_sizes(ids, chunk_size, boundaries)
        if len(sizes) <= max_chunks:
            return sizes
    return fixed_chunk_sizes(n, chunk_size)


def plan_batch(input_ids: Sequence[Sequence[int]], chunk_size: int, max_len: int | None, boundaries: frozenset[int],
               key: str) -> list[list[int]]:
    """The mixed plans of a batch's sequences, each drawn from `key` (the run's seed, the step, the replica) and its
    position: a resumed run draws the same plans, and every pipeline stage, which lays out the step itself, the same
    ones. max_len: the longest a sample may be (train.max_tokens), else each sample's own length."""
    return [plan_chunks(ids, chunk_size, max_len or len(ids), random.Random(f"chunk-plan:{key}:{i}"), boundaries)
            for i, ids in enumerate(input_ids)]


def boundary_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's single-token newline, sentence and clause ends, and its end-of-turn / eos tokens."""
    found = {tokenizer.eos_token_id}
    for text in ("\n", "\n\n", ".", ",", "。", "<|im_end|>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            found.add(ids[0])
    return frozenset(i for i in found if i is not None)
