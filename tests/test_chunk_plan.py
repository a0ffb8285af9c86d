"""The mixed chunk plan's strategies, against sizes worked out by hand."""

import random

import pytest

from comet_ds.config import CometConfig, CometConfigError, CometTokens
from comet_ds.layout import ChunkLayout
from comet_ds.layout.plan import (
    MIN_CHUNK,
    boundary_ids,
    plan_batch,
    plan_chunks,
    random_sizes,
    regime,
    right_aligned_sizes,
    semantic_sizes,
    uniform_sizes,
)
from comet_ds.train.config import TrainSettings

TOKENS = CometTokens(placeholder_id=900, temp_beacon_id=901, global_beacon_ids=(902, 903), pad_id=0)


def test_right_aligned_puts_the_partial_chunk_first():
    assert right_aligned_sizes(37, 16) == [5, 16, 16]
    assert right_aligned_sizes(32, 16) == [16, 16]


def test_uniform_sizes_differ_by_at_most_one():
    assert uniform_sizes(30000, 16) == [1875] * 16
    assert uniform_sizes(30001, 16) == [1876] + [1875] * 15
    assert uniform_sizes(37, 4) == [10, 9, 9, 9]
    assert uniform_sizes(3, 8) == [1, 1, 1]  # never an empty chunk


def test_random_sizes_stay_in_bounds_and_follow_the_seed():
    assert random_sizes(64, 16, 4, random.Random(0)) == [16, 16, 16, 16]  # 4 chunks is the only count that fits
    assert random_sizes(10, 16, 1, random.Random(0)) == [10]
    counts = set()
    for seed in range(200):
        sizes = random_sizes(50, 16, 8, random.Random(seed))
        assert sum(sizes) == 50 and all(MIN_CHUNK <= s <= 16 for s in sizes), sizes
        assert sizes == random_sizes(50, 16, 8, random.Random(seed))
        counts.add(len(sizes))
    assert counts == {4, 5, 6, 7, 8}  # from ceil(50 / 16) to the 8 allowed (50 // 4 = 12 would fit more)


def test_semantic_cuts_after_the_last_boundary_that_leaves_room():
    b = frozenset({99})
    # from 0: the last boundary within 8 tokens is at index 3 -> cut after it (10 tokens stay);
    # from 4: within 4..12 the last is at index 9 -> cut at 10 (4 stay); then the rest
    assert semantic_sizes([1, 2, 3, 99, 5, 6, 7, 8, 9, 99, 11, 12, 13, 14], 8, b) == [4, 6, 4]
    assert semantic_sizes(list(range(14)), 8, b) == [8, 6]  # no boundary: full chunks
    # a cut after the boundary 3 tokens in would make a chunk shorter than MIN_CHUNK: the chunk is full instead
    assert semantic_sizes([1, 2, 99, 4, 5, 6, 7, 8, 99, 10, 11], 8, b) == [8, 3]


def test_length_regimes():
    assert regime(15, 16, 100) == "short"
    assert regime(16, 16, 100) == "medium"
    assert regime(74, 16, 100) == "medium"
    assert regime(75, 16, 100) == "long"


def test_mixed_plans_draw_strategies_in_the_papers_proportions():
    ids = list(range(40))  # medium with max_len 96: fixed 60%, right-aligned 10%, random 20%, uniform 5%, semantic 5%
    plans = [plan_chunks(ids, 16, 96, random.Random(seed), frozenset()) for seed in range(4000)]
    assert all(sum(p) == 40 and all(1 <= s <= 16 for s in p) for p in plans)
    fixed = sum(p == [16, 16, 8] for p in plans) / len(plans)
    right = sum(p == [8, 16, 16] for p in plans) / len(plans)
    # fixed also comes from semantic (no boundaries here: full chunks) and random sizes that draw 3 chunks
    assert 0.62 <= fixed <= 0.72 and 0.08 <= right <= 0.12
    assert sum(len(p) == 6 and max(p) - min(p) <= 1 for p in plans) > 0.05 * len(plans)  # uniform: 6 chunks of 6-7


def test_plan_batch_is_the_same_for_the_same_step_and_differs_between_steps():
    batch = [list(range(200)), list(range(120))]
    first = plan_batch(batch, 16, 256, frozenset(), "0:5:0")
    assert first == plan_batch(batch, 16, 256, frozenset(), "0:5:0")
    assert any(plan_batch(batch, 16, 256, frozenset(), f"0:{step}:0") != first for step in range(6, 12))
    chunks = ChunkLayout(CometConfig(chunk_size=16, global_slots=2, temp_stride=4, temp_budget=6),
                         TOKENS).layout(batch, text_chunk_sizes=first)
    assert len(chunks) == max(map(len, first))


def test_boundaries_come_from_the_tokenizer(base_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    found = boundary_ids(tokenizer)
    assert tokenizer.eos_token_id in found
    assert all(len(tokenizer.decode([i]).strip()) <= 10 for i in found)


def test_an_unknown_chunk_plan_is_refused():
    with pytest.raises(CometConfigError, match=r"train\.chunk_plan must be one of fixed, mixed"):
        TrainSettings(chunk_plan="semantic")
