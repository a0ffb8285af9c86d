import pytest
import torch
from helpers import finite_logits, trained_like

from comet_ds.config import CometConfig
from comet_ds.layout import ChunkLayout, Role, attention_mask_from_roles
from comet_ds.modeling import layer as layer_module
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.layer import chunk_attention_mask
from comet_ds.modeling.memory import GlobalMemory
from comet_ds.modeling.pretrained import build_comet

# Q=6 with 4 beacons per chunk: the queue overflows from chunk 2 on and evicts mid-chunk.
CONFIG = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=6)


def sequences(tokenizer, lengths=(80, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) - CONFIG.global_slots - 2  # plain text ids only
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_streaming_equals_layer_major_reference(base_dirs, arch):
    model, tokenizer = build_comet(base_dirs[arch], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer))
    assert len(chunks) >= 4
    ref = model.forward_reference(chunks, return_logits=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(chunks, return_logits=True)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    assert (finite_logits(out.logits) - finite_logits(ref.logits)).abs().max().item() <= 1e-5
    assert ref_grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_single_chunk_equals_the_plain_hf_forward(base_dirs, arch):
    """One chunk has no memory to inject: CoMeT must then be the unmodified HF model on its tokens."""
    model, tokenizer = build_comet(base_dirs[arch], CONFIG)
    (chunk,) = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(13,)))
    with torch.no_grad():
        ours = model([chunk], return_logits=True).logits[0]
        hf = model.backbone(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits
    attended = chunk.attention_mask[0].bool()
    text_vocab = ~model.head.not_predicted
    torch.testing.assert_close(ours[0][attended][:, text_vocab], hf[0][attended][:, text_vocab],
                               atol=1e-5, rtol=1e-5)
    assert torch.isinf(ours[..., model.tokens.placeholder_id]).all()  # inserted tokens are never predicted


@pytest.mark.parametrize("vocabulary", ["text", "full"])
def test_loss_vocabulary_chooses_the_softmax_of_the_loss(base_dirs, vocabulary):
    """"full" scores over the whole vocabulary as the paper's code does, "text" leaves the inserted tokens out."""
    import dataclasses

    import torch.nn.functional as F

    from comet_ds.layout import IGNORE_INDEX

    model, tokenizer = build_comet(base_dirs["llama"], dataclasses.replace(CONFIG, loss_vocabulary=vocabulary))
    (chunk,) = ChunkLayout(model.config, model.tokens).layout(sequences(tokenizer, lengths=(13,)))
    with torch.no_grad():
        ours = model([chunk]).loss
        hf = model.backbone(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits[0]
    labelled = chunk.labels[0] != IGNORE_INDEX
    logits = hf[labelled]
    if vocabulary == "text":
        logits = logits.masked_fill(model.head.not_predicted, float("-inf"))
    torch.testing.assert_close(ours, F.cross_entropy(logits, chunk.labels[0][labelled]), atol=1e-5, rtol=1e-5)
    assert torch.isinf(model([chunk], return_logits=True).logits[0][..., model.tokens.placeholder_id]).all()


def test_memory_that_restarts_at_each_packed_document_equals_the_documents_alone(base_dirs):
    from comet_ds.layout import IGNORE_INDEX
    from comet_ds.layout.chunks import fixed_chunk_sizes, restart_plan

    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    trained_like(model)
    layout = ChunkLayout(CONFIG, model.tokens)
    *documents, other = sequences(tokenizer, lengths=(37, 20, 50, 90))
    sizes, restarts = restart_plan([fixed_chunk_sizes(len(d), CONFIG.chunk_size) for d in documents])
    assert sizes == [16, 16, 5, 16, 4, 16, 16, 16, 2] and restarts == [3, 5]
    packed = [token for document in documents for token in document]
    labels = [label for document in documents for label in [IGNORE_INDEX, *document[1:]]]
    # the packed row restarts, the other row of the batch goes on: the restart is per row
    together = model(layout.layout([packed, other], [labels, other], [sizes, fixed_chunk_sizes(90, 16)],
                                   [restarts, []]))
    together.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = sum(model(layout.layout([sequence])).loss_sum for sequence in [*documents, other])
    alone.backward()
    torch.testing.assert_close(together.loss_sum, alone, atol=1e-4, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_first_chunk_has_no_gate(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(64,)))
    calls = []
    for layer in model.layers:
        layer.memory.global_memory.gate.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(chunks)
    assert len(chunks) == 4
    assert len(calls) == (len(chunks) - 1) * len(model.layers)


def test_global_memory_update_rule():
    torch.manual_seed(0)
    net = GlobalMemory(hidden_size=8, rank=2)
    beacons, previous = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    memory, state = net(beacons, None)
    torch.testing.assert_close(state, net.norm(beacons))  # first chunk: s = c, no gate
    torch.testing.assert_close(memory, state + net.adapter.up(net.adapter.down(state)))
    _, state = net(beacons, previous)
    candidate = net.norm(beacons)
    gate = torch.sigmoid(net.gate(torch.cat([candidate, previous], dim=-1)))
    assert gate.shape == (1, 3, 1)  # one scalar gate per slot
    torch.testing.assert_close(state, gate * previous + (1 - gate) * candidate)  # the gate keeps the old state
    with torch.no_grad():
        net.gate.weight.fill_(0.0)
        net.gate.weight[0, 8:] = 1e4 * previous[0, 0].sign()  # drive g → 1 for slot 0
    _, state = net(beacons, previous)
    torch.testing.assert_close(state[0, 0], previous[0, 0])


def test_fifo_eviction_keeps_the_newest_entries(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(80,)))
    entries = {i: [] for i in range(len(model.layers))}
    for i, layer in enumerate(model.layers):
        layer.memory.temp_memory.register_forward_hook(lambda _m, _i, out, i=i: entries[i].append(out))
    with torch.no_grad():
        out = model(chunks)
    for i, state in enumerate(out.states):
        assert state.temp_memory.shape == (1, CONFIG.temp_budget, model.backbone.config.hidden_size)
        newest = torch.cat(entries[i], dim=1)[:, -CONFIG.temp_budget:]  # all chunks are full: no fillers
        torch.testing.assert_close(state.temp_memory, newest)


def test_memory_carries_information_across_chunks(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    layout = ChunkLayout(CONFIG, model.tokens)
    (seq,) = sequences(tokenizer, lengths=(64,))
    changed = [(t + 7) % 500 + 4 for t in seq[:16]] + seq[16:]
    only_last = [-100] * 48 + seq[48:]
    with torch.no_grad():
        a = model(layout.layout([seq], [only_last])).loss
        b = model(layout.layout([changed], [only_last])).loss
    assert a.item() != b.item()


def test_gradient_reaches_every_memory_parameter(base_dirs):
    model, tokenizer = build_comet(base_dirs["qwen3"], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(64,)))
    model(chunks).loss.backward()
    for name, param in model.comet_state_dict().items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    row_grads = model.embedding.new_rows.grad.abs().sum(dim=-1)
    rows = model.embedding.row_of_id
    beacons = rows[torch.tensor([model.tokens.temp_beacon_id, *model.tokens.global_beacon_ids])]
    assert (row_grads[beacons] > 0).all()
    # placeholders are replaced by memories at every layer's input: their embedding never counts
    assert row_grads[rows[model.tokens.placeholder_id]] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_step_moves_adapters_and_memory_but_not_the_base(base_dirs, arch):
    model, tokenizer = build_comet(base_dirs[arch], CONFIG, FinetuneSettings(method="lora"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert model.embedding.base.weight.requires_grad is False and "embedding.new_rows" not in frozen
    assert all("lora_" not in n and ".memory." not in n for n in frozen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(64,)))
    for _ in range(2):  # LoRA B starts at zero: A moves on the second step
        model(chunks).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    moved = {n for n in before if n not in frozen and not torch.equal(after[n], before[n])}
    assert moved == set(before) - frozen
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any(".memory.global_memory.gate" in n for n in moved) and "embedding.new_rows" in moved


def test_full_finetune_trains_everything(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG, FinetuneSettings(method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_inserted_tokens_are_single_special_tokens(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    ids = tokenizer("x <|memory|> <beacon> <beacon_3>", add_special_tokens=False).input_ids
    assert {model.tokens.placeholder_id, model.tokens.temp_beacon_id, model.tokens.global_beacon_ids[3]} <= set(ids)
    assert len(set(model.tokens.inserted_ids)) == CONFIG.global_slots + 2
    tokens = model.tokens
    assert tokenizer.convert_ids_to_tokens([tokens.placeholder_id, tokens.temp_beacon_id, *tokens.global_beacon_ids]) \
        == ["<|memory|>", "<beacon>", "<beacon_0>", "<beacon_1>", "<beacon_2>", "<beacon_3>"]


def test_activation_checkpointing_gives_the_same_gradients(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(64,)))
    model(chunks).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for layer in model.layers:
        layer.activation_checkpointing = True
    model(chunks).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-7, rtol=1e-6)


# -- the chunk's attention mask: boolean, or none where causal attention is exact ----------------------------


def additive_mask(roles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk mask as an additive float [B, 1, L, L] tensor (0 where a token may attend, the dtype's
    minimum elsewhere; causal inside the chunk, masked keys hidden): the formulation that
    chunk_attention_mask replaced, kept here as the reference it must equal."""
    length = roles.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=roles.device).tril()
    allowed = causal & attention_mask_from_roles(roles).bool()[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=roles.device).masked_fill(~allowed,
                                                                                    torch.finfo(dtype).min)[:, None]


def loss_logits_gradients(model, chunks) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(chunks, return_logits=True)
    out.loss.backward()
    return (out.loss.detach(), torch.cat(out.logits, dim=1).detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


# one sequence in full chunks: no chunk needs a mask; two of unequal length: the shorter one's second chunk
# (2 text tokens) leaves fewer real queue entries than Q, so a filler keeps a queue slot, empty and ahead
# of attended tokens, in the chunks after it, and those take the boolean mask
LAYOUTS = {"one sequence": (80,), "two sequences": (80, 18)}


def masks_taken(chunks) -> tuple[int, int]:
    """(chunks run without a mask, chunks run with a boolean mask)."""
    masks = [chunk_attention_mask(c.roles) for c in chunks]
    assert all(m is None or m.dtype == torch.bool for m in masks)
    return sum(m is None for m in masks), sum(m is not None for m in masks)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunk_masks_equal_the_additive_mask_exactly_in_fp32(base_dirs, arch, layout, monkeypatch):
    """Loss, every gradient and the logits of every attended token are bit for bit those of the additive
    float mask; the rows of masked tokens (padding, fillers), which nothing reads, stay finite.

    Hugging Face's sdpa call repeats the keys of a head group when a mask is given and lets sdpa group
    them (enable_gqa) when none is: the same sums, but the key and value gradients of a group add up in
    another order. TRANSFORMERS_SDPA_FORCE_GQA makes both formulations group heads alike, so that the
    masks alone are compared; as Hugging Face picks, the forward stays exact and gradients are an ulp off.
    """
    model, tokenizer = build_comet(base_dirs[arch], CONFIG)
    trained_like(model)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=LAYOUTS[layout]))
    without, boolean = masks_taken(chunks)
    assert without >= 1 and (boolean == 0 if layout == "one sequence" else boolean >= 1)
    attended = torch.cat([c.attention_mask for c in chunks], dim=1).bool()

    def both() -> tuple[tuple, tuple]:
        ours = loss_logits_gradients(model, chunks)
        with monkeypatch.context() as patch:
            patch.setattr(layer_module, "chunk_attention_mask", lambda roles: additive_mask(roles, torch.float32))
            return ours, loss_logits_gradients(model, chunks)

    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = both()
    assert torch.equal(loss, ref_loss)
    assert torch.equal(logits[attended], ref_logits[attended])
    assert not torch.isnan(logits).any()
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8)
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = both()
    assert torch.equal(loss, ref_loss)
    assert torch.equal(logits[attended], ref_logits[attended])
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunk_masks_equal_the_additive_mask_in_bf16(base_dirs, arch, monkeypatch):
    model, tokenizer = build_comet(base_dirs[arch], CONFIG, dtype=torch.bfloat16)
    trained_like(model)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=LAYOUTS["two sequences"]))
    loss, logits, grads = loss_logits_gradients(model, chunks)
    monkeypatch.setattr(layer_module, "chunk_attention_mask", lambda roles: additive_mask(roles, torch.bfloat16))
    ref_loss, ref_logits, ref_grads = loss_logits_gradients(model, chunks)
    attended = torch.cat([c.attention_mask for c in chunks], dim=1).bool()
    bf16 = {"rtol": 1.6e-2, "atol": 1e-2}  # a few units in bf16's last place (8 bits of mantissa)
    torch.testing.assert_close(loss, ref_loss, **bf16)
    torch.testing.assert_close(logits[attended], ref_logits[attended], **bf16)
    for name, grad in ref_grads.items():
        error = (grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert error <= 1.6e-2, name


def test_chunk_mask_is_causal_over_attended_keys_and_never_masks_a_whole_row():
    t, pad, empty = Role.TEXT, Role.PAD, Role.TEMP_SLOT_EMPTY
    assert chunk_attention_mask(torch.tensor([[t, t, Role.GLOBAL_BEACON, Role.TEMP_BEACON_FILLER, pad]])) is None
    roles = torch.tensor([[empty, t, empty, t, pad]])  # the first token has no attended key at or before it
    mask = chunk_attention_mask(roles)[0, 0]
    assert mask.tolist() == [[True, False, False, False, False],  # itself, rather than no key at all
                             [False, True, False, False, False],
                             [False, True, False, False, False],
                             [False, True, False, True, False],
                             [False, True, False, True, False]]
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_comet_refuses_a_base_that_does_not_run_sdpa(base_dirs):
    from transformers import AutoModelForCausalLM

    from comet_ds.modeling.backbone import UnsupportedModelError
    from comet_ds.modeling.model import CometForCausalLM

    model, _ = build_comet(base_dirs["llama"], CONFIG)
    eager = AutoModelForCausalLM.from_pretrained(base_dirs["llama"], attn_implementation="eager")
    with pytest.raises(UnsupportedModelError, match="runs 'eager' attention; CoMeT needs 'sdpa'"):
        CometForCausalLM(eager, CONFIG, model.tokens)


def test_a_stream_goes_on_from_the_memories_a_previous_call_returned(base_dirs):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    chunks = ChunkLayout(CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(80,)))
    with torch.no_grad():
        whole = model(chunks)
        first = model(chunks[:2])
        rest = model(chunks[2:], states=first.states)
    torch.testing.assert_close(first.loss_sum + rest.loss_sum, whole.loss_sum)  # summed in another order
    for ours, theirs in zip(rest.states, whole.states):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="1 memory states for 2 layers"):
        model(chunks, states=[None])
