import pytest
import torch

from comet_ds.config import CometConfig, CometConfigError, CometTokens
from comet_ds.layout import IGNORE_INDEX, ChunkIndices, ChunkLayout, Role

P, B, PAD = 100, 101, 0
GB = (110, 111, 112, 113)
TOY = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=8)
TOY_TOKENS = CometTokens(placeholder_id=P, temp_beacon_id=B, global_beacon_ids=GB, pad_id=PAD)


def text_with_beacons(first: int) -> list[int]:
    out = []
    for group in range(4):
        out += [*range(first + 4 * group, first + 4 * group + 4), B]
    return out


def indices(chunk, config=TOY):
    idx = ChunkIndices.from_roles(chunk.roles, config.queue_capacity)
    return {name: getattr(idx, name)[0].tolist()
            for name in ("global_slots", "temp_slots", "temp_beacons", "global_beacons", "temp_keep")}


# role names short enough to write a chunk out position by position
T, TB, TBF, GS, TS, TSE, GBR, PD = (Role.TEXT, Role.TEMP_BEACON, Role.TEMP_BEACON_FILLER, Role.GLOBAL_SLOT,
                                    Role.TEMP_SLOT, Role.TEMP_SLOT_EMPTY, Role.GLOBAL_BEACON, Role.PAD)


def test_worked_example_of_the_layout():
    """C=16, s=4, G=4, Q=8 on the tokens 1..64, padded to one static length."""
    chunks = ChunkLayout(TOY, TOY_TOKENS).layout([list(range(1, 65))])
    assert len(chunks) == 4
    assert TOY.chunk_length == 36
    assert all(c.input_ids.shape == (1, 36) for c in chunks)

    # chunk 0 has no memory to receive; chunk 1 receives chunk 0's 4 entries, chunk 2 a full queue of 8
    assert chunks[0].roles[0].tolist() == [T, T, T, T, TB] * 4 + [GBR] * 4 + [PD] * 12
    assert chunks[1].roles[0].tolist() == [GS] * 4 + [TS] * 4 + [T, T, T, T, TB] * 4 + [GBR] * 4 + [PD] * 4
    assert chunks[2].roles[0].tolist() == [GS] * 4 + [TS] * 8 + [T, T, T, T, TB] * 4 + [GBR] * 4

    ids0 = chunks[0].input_ids[0].tolist()
    assert ids0[:24] == [*text_with_beacons(1), *GB]
    assert ids0[24:] == [PAD] * 12
    assert indices(chunks[0]) == {"global_slots": [], "temp_slots": [], "temp_beacons": [4, 9, 14, 19],
                                  "global_beacons": [20, 21, 22, 23], "temp_keep": [0, 1, 2, 3]}

    ids1 = chunks[1].input_ids[0].tolist()
    assert ids1[:32] == [P] * 8 + text_with_beacons(17) + list(GB)
    assert indices(chunks[1]) == {"global_slots": [0, 1, 2, 3], "temp_slots": [4, 5, 6, 7],
                                  "temp_beacons": [12, 17, 22, 27], "global_beacons": [28, 29, 30, 31],
                                  "temp_keep": list(range(8))}

    ids2 = chunks[2].input_ids[0].tolist()
    assert ids2 == [P] * 12 + text_with_beacons(33) + list(GB)
    assert indices(chunks[2]) == {"global_slots": [0, 1, 2, 3], "temp_slots": list(range(4, 12)),
                                  "temp_beacons": [16, 21, 26, 31], "global_beacons": [32, 33, 34, 35],
                                  "temp_keep": list(range(4, 12))}  # the oldest 4 are dropped

    # labels: shifted on the text alone; every inserted token and the very last token are ignored
    labels = {tok: lab for c in chunks for tok, lab, role in
              zip(c.input_ids[0].tolist(), c.labels[0].tolist(), c.roles[0].tolist()) if role == Role.TEXT}
    assert labels == {**{t: t + 1 for t in range(1, 64)}, 64: IGNORE_INDEX}
    for c in chunks:
        inserted = c.roles[0] != Role.TEXT
        assert (c.labels[0][inserted] == IGNORE_INDEX).all()

    # positions restart in every chunk; padding repeats the count of real tokens
    assert chunks[0].position_ids[0].tolist() == list(range(24)) + [24] * 12
    assert chunks[2].position_ids[0].tolist() == list(range(36))
    assert chunks[0].attention_mask[0].tolist() == [1] * 24 + [0] * 12


def test_a_short_chunk_pads_its_beacons_and_its_fillers_are_masked_slots_next_chunk():
    """Tokens 1..22 in chunks of 6 and 16 text tokens: chunk 0 has beacons after tokens 4 and 6 (the
    last text token) and 2 fillers to make up ceil(C/s) = 4 entries; chunk 1 receives the 4 entries
    in order, its last 2 slots masked."""
    chunks = ChunkLayout(TOY, TOY_TOKENS).layout([list(range(1, 23))], text_chunk_sizes=[[6, 16]])
    assert chunks[0].input_ids[0].tolist() == [1, 2, 3, 4, B, 5, 6, B, *GB, PAD, PAD] + [PAD] * 22
    assert chunks[0].roles[0].tolist() == [T, T, T, T, TB, T, T, TB] + [GBR] * 4 + [TBF] * 2 + [PD] * 22
    assert chunks[0].attention_mask[0].tolist() == [1] * 12 + [0] * 24

    assert chunks[1].input_ids[0].tolist() == [P] * 8 + text_with_beacons(7) + list(GB) + [PAD] * 4
    assert chunks[1].roles[0].tolist() == [GS] * 4 + [TS, TS, TSE, TSE] + [T, T, T, T, TB] * 4 + [GBR] * 4 + [PD] * 4
    # a masked slot takes no position: the text goes on from the last attended slot
    assert chunks[1].position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, *range(6, 30), 30, 30, 30, 30]
    assert indices(chunks[1]) == {"global_slots": [0, 1, 2, 3], "temp_slots": [4, 5, 6, 7],
                                  "temp_beacons": [12, 17, 22, 27], "global_beacons": [28, 29, 30, 31],
                                  "temp_keep": list(range(8))}
    # labels: 6 → 7 crosses the chunk boundary; fillers and padding train nothing
    assert chunks[0].labels[0].tolist()[:8] == [2, 3, 4, 5, IGNORE_INDEX, 6, 7, IGNORE_INDEX]
    assert (chunks[0].labels[0][8:] == IGNORE_INDEX).all()


def queue_provenance_mismatches(chunks, config):
    """Follow every temporary memory entry through the FIFO and report the temp slots where a
    filler entry lands in an attended slot or a real entry in a masked one."""
    queue: list[bool] = []
    wrong = []
    for chunk in chunks:
        roles = chunk.roles[0]
        idx = ChunkIndices.from_roles(chunk.roles, config.queue_capacity)
        slot_roles = roles[idx.temp_slots[0]].tolist()
        assert len(slot_roles) == len(queue)
        wrong += [(chunk.index, j) for j, (real, role) in enumerate(zip(queue, slot_roles))
                  if real != (role == Role.TEMP_SLOT)]
        new = (roles[idx.temp_beacons[0]] == Role.TEMP_BEACON).tolist()
        merged = queue + new
        realness = torch.tensor([merged])
        keep = torch.topk(realness.long() * len(merged) + torch.arange(len(merged)),
                          min(config.queue_capacity, len(merged))).indices.sort().values[0]
        queue = [merged[k] for k in keep.tolist()]
    return wrong


def real_slots_first(chunk):
    """The chunk with its attended temp slots moved first and masked ones last: a placement that
    misaligns slots and queue entries whenever fillers sit between real entries."""
    roles = chunk.roles.clone()
    slots = ((roles == Role.TEMP_SLOT) | (roles == Role.TEMP_SLOT_EMPTY)).nonzero()[:, 1]
    n_real = int((roles == Role.TEMP_SLOT).sum())
    roles[0, slots] = Role.TEMP_SLOT_EMPTY
    roles[0, slots[:n_real]] = Role.TEMP_SLOT
    return type(chunk)(index=chunk.index, input_ids=chunk.input_ids, labels=chunk.labels, roles=roles)


def test_filler_memories_never_land_in_attended_slots():
    # Chunks shorter than C put fillers between real entries in the queue.
    config = CometConfig(chunk_size=16, global_slots=2, temp_stride=4, temp_budget=12)
    tokens = CometTokens(placeholder_id=P, temp_beacon_id=B, global_beacon_ids=(110, 111), pad_id=PAD)
    sizes = [10, 9, 16, 5, 16, 16]
    chunks = ChunkLayout(config, tokens).layout([list(range(1, sum(sizes) + 1))], text_chunk_sizes=[sizes])
    assert queue_provenance_mismatches(chunks, config) == []
    # The same chunks with real slots first are caught by the same check. Beacons per chunk (real +
    # filler): 3+1, 3+1, 4, 2+2, 4, 4, so chunk 2 receives R R R F R R R F and chunk 3 that plus R R R R;
    # real-first then marks slots 3 and 6 of chunk 2 and slots 3, 7, 10 and 11 of chunk 3 wrongly.
    # Chunk 3's 2 fillers are evicted at once (12 real entries fill the queue), so chunks 4 and 5 agree.
    flawed = [real_slots_first(c) for c in chunks]
    assert queue_provenance_mismatches(flawed, config) == [(2, 3), (2, 6), (3, 3), (3, 7), (3, 10), (3, 11)]


def test_fifo_keeps_the_newest_real_entries():
    config = CometConfig(chunk_size=8, global_slots=1, temp_stride=4, temp_budget=3)
    tokens = CometTokens(placeholder_id=P, temp_beacon_id=B, global_beacon_ids=(110,), pad_id=PAD)
    chunks = ChunkLayout(config, tokens).layout([list(range(1, 25))])
    keeps = [ChunkIndices.from_roles(c.roles, 3).temp_keep[0].tolist() for c in chunks]
    # queue 0+2 new → keep both; 2+2 → newest 3 of 4; 3+2 → newest 3 of 5
    assert keeps == [[0, 1], [1, 2, 3], [2, 3, 4]]


def test_batch_of_different_lengths_pads_with_empty_chunks():
    layout = ChunkLayout(TOY, TOY_TOKENS)
    chunks = layout.layout([list(range(1, 41)), list(range(1, 11))])
    assert len(chunks) == 3
    assert all(c.input_ids.shape == (2, TOY.chunk_length) for c in chunks)
    empty = chunks[2].roles[1]
    assert int((empty == Role.TEXT).sum()) == 0
    assert int((empty == Role.GLOBAL_SLOT).sum()) == 4
    assert chunks[2].num_labels == 7  # 8 text tokens of the first sequence, the last has no target
    # per-chunk index shapes agree across the batch, as the pipeline needs
    for c in chunks:
        ChunkIndices.from_roles(c.roles, TOY.queue_capacity)


def test_without_temporary_memory_there_are_no_beacons():
    config = CometConfig(chunk_size=8, global_slots=2, temp_stride=-1, temp_budget=0)
    tokens = CometTokens(placeholder_id=P, temp_beacon_id=B, global_beacon_ids=(110, 111), pad_id=PAD)
    chunks = ChunkLayout(config, tokens).layout([list(range(1, 17))])
    assert chunks[1].input_ids[0].tolist() == [P, P, *range(9, 17), 110, 111]


def test_labels_follow_the_given_mask():
    layout = ChunkLayout(TOY, TOY_TOKENS)
    ids = list(range(1, 21))
    labels = [IGNORE_INDEX] * 15 + ids[15:]  # train only on the last 5 tokens
    chunks = layout.layout([ids], [labels])
    trained = sorted(x for c in chunks for x in c.labels[0].tolist() if x != IGNORE_INDEX)
    assert trained == [16, 17, 18, 19, 20]  # the answer tokens 16..20, predicted by tokens 15..19


@pytest.mark.parametrize("sizes", [[16, 20], [0, 36], [10, 10]])
def test_bad_chunk_plans_are_rejected(sizes):
    with pytest.raises(CometConfigError, match="chunk sizes"):
        ChunkLayout(TOY, TOY_TOKENS).layout([list(range(36))], text_chunk_sizes=[sizes])


def test_empty_sequence_is_rejected():
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        ChunkLayout(TOY, TOY_TOKENS).layout([[]])
