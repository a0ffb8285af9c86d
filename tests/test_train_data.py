"""The training sampler: seeded global batches every rank derives alike, optionally one length a step."""

from collections import Counter

from datasets import Dataset

from comet_ds.train.data import StepSampler, pack_rows, sequence_lengths, trained_tokens

# 11 rows of 8 tokens, 5 of 16, 2 of 32: with a global batch of 4, the 32s are rarer than one batch
LENGTHS = [8] * 11 + [16] * 5 + [32] * 2


def mixed_dataset() -> Dataset:
    rows = [[index] * length for index, length in enumerate(LENGTHS)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def test_lengths_come_from_the_arrow_offsets_and_respect_max_tokens():
    dataset = mixed_dataset()
    assert sequence_lengths(dataset) == LENGTHS
    assert sequence_lengths(dataset, max_tokens=12) == [min(n, 12) for n in LENGTHS]
    assert sequence_lengths(dataset.select([12, 0])) == [16, 8]


def test_grouped_batches_hold_one_length_and_cover_every_row_each_epoch():
    sampler = StepSampler(mixed_dataset(), replicas=2, sequences_per_replica=2, seed=5, group_by_length=True)
    per_epoch = 3 + 2 + 1  # ceil(11/4) + ceil(5/4) + ceil(2/4)
    for epoch in range(2):
        seen = Counter()
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rows = [row for replica in range(2) for row in sampler.batch(step, replica).input_ids]
            assert len(rows) == 4 and len({len(r) for r in rows}) == 1, step
            seen.update(r[0] for r in rows)
        assert set(seen) == set(range(len(LENGTHS)))  # nothing skipped; short groups are topped up
        assert sum(seen.values()) == 4 * per_epoch


def test_grouped_order_is_seeded_and_resumes_at_any_step():
    def run(seed: int, start: int = 0) -> list[list[int]]:
        sampler = StepSampler(mixed_dataset(), 1, 4, seed, group_by_length=True)
        return [[r[0] for r in sampler.batch(step, 0).input_ids] for step in range(start, 14)]

    assert run(seed=5) == run(seed=5)
    assert run(seed=5)[9:] == run(seed=5, start=9)  # a fresh sampler (a resumed run) at step 9
    assert run(seed=5) != run(seed=6)


def test_ungrouped_batches_cover_each_row_once_an_epoch_and_mix_lengths():
    sampler = StepSampler(mixed_dataset(), 1, 6, seed=5)
    batches = [sampler.batch(step, 0).input_ids for step in range(6)]  # 18 rows, 6 a step: 3 steps an epoch
    for epoch in (batches[:3], batches[3:]):
        assert sorted(row[0] for batch in epoch for row in batch) == list(range(len(LENGTHS)))
    assert [row[0] for row in batches[0]] != [row[0] for row in batches[3]]  # each epoch its own order
    assert any(len({len(r) for r in batch}) > 1 for batch in batches)


def test_rows_pack_greedily_up_to_max_tokens():
    assert pack_rows([3, 4, 5, 10, 2], 8) == [[0, 1], [2], [3], [4]]  # 3+4; 5 (+10 > 8); 10 cut to 8; 2
    assert pack_rows([2, 2, 2, 2, 2], 8) == [[0, 1, 2, 3], [4]]


def test_packed_sequences_keep_every_documents_labels():
    rows = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10] * 9]
    labels = [[-100, 2, 3], [-100, -100, 6, 7], [8, 9], [10] * 9]
    sampler = StepSampler(Dataset.from_dict({"input_ids": rows, "labels": labels}), 1, 3, seed=0, max_tokens=8,
                          packing=True)
    assert sampler.sequences == [[0, 1], [2], [3]]
    batch = sampler.batch(0, 0)
    packed = batch.input_ids.index([1, 2, 3, 4, 5, 6, 7])
    # the second document's first label would be the first document's last target once shifted: ignored
    assert batch.labels[packed] == [-100, 2, 3, -100, -100, 6, 7]
    assert sorted(map(len, batch.input_ids)) == [2, 7, 8]  # the 9-token row cut to max_tokens
    # trained tokens per document as unpacked: 2 + 2, 1, 7
    assert batch.global_trained_tokens == sum(trained_tokens(x[:8]) for x in labels)


def test_packing_needs_a_sequence_length():
    import pytest

    from comet_ds.config import CometConfigError
    from comet_ds.train.config import TrainSettings

    with pytest.raises(CometConfigError, match=r"set train\.max_tokens"):
        TrainSettings(packing=True)


def test_packed_documents_start_chunks_of_their_own_when_memory_resets():
    from comet_ds.train.config import RunConfig
    from comet_ds.train.data import StepBatch
    from comet_ds.train.loop import chunk_plans

    def run(**train):
        return RunConfig.from_dict({"base_model": "b", "dataset": "d", "output_dir": "o", "deepspeed_config": "c",
                                    "comet": {"chunk_size": 16}, "train": {"max_tokens": 64, **train}})

    batch = StepBatch([list(range(40)), list(range(20))], [[0] * 40, [0] * 20], 0, 60, documents=[[30, 10], [20]])
    assert chunk_plans(batch, run(), frozenset(), "k") == (None, None)
    assert chunk_plans(batch, run(packing=True, reset_memory_per_document=True), frozenset(), "k") == \
        ([[16, 14, 10], [16, 4]], [[2], []])
    plans, restarts = chunk_plans(batch, run(packing=True, reset_memory_per_document=True, chunk_plan="mixed"),
                                  frozenset(), "k")
    assert [sum(p) for p in plans] == [40, 20] and restarts[1] == []
    assert sum(plans[0][:restarts[0][0]]) == 30  # the second document starts a chunk
