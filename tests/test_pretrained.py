import json

import pytest
import torch
from helpers import finite_logits, trained_like
from transformers import GPT2Config, GPT2LMHeadModel

from comet_ds.cli import main
from comet_ds.config import CometConfig, CometConfigError
from comet_ds.layout import ChunkLayout
from comet_ds.modeling.backbone import UnsupportedModelError
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.pretrained import (
    COMET_CONFIG,
    CheckpointMismatchError,
    build_comet,
    load_comet,
    save_comet,
)
from comet_ds.modeling.tiny_base import init_base

CONFIG = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=6)


def logits_of(model, ids):
    chunks = ChunkLayout(model.config, model.tokens).layout([ids])
    with torch.no_grad():
        return finite_logits(model(chunks, return_logits=True).logits)


IDS = list(range(10, 80))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_directory_round_trip_and_merged_export(base_dirs, arch, tmp_path):
    model, tokenizer = build_comet(base_dirs[arch], CONFIG)
    trained_like(model)
    expected = logits_of(model, IDS)
    save_comet(model, tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs[arch])
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "comet_memory.safetensors", COMET_CONFIG} <= names
    assert "model.safetensors" not in names  # base weights stay with the base

    loaded, _, settings = load_comet(tmp_path / "adapter")
    assert settings.method == "lora"
    assert torch.equal(logits_of(loaded, IDS), expected)
    assert not loaded.embedding.base.weight.requires_grad

    main(["export", "--adapter", str(tmp_path / "adapter"), "--merge", "--out", str(tmp_path / "merged")])
    merged, _, _ = load_comet(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, IDS), expected, atol=1e-5, rtol=1e-5)


def test_a_merged_export_never_generates_inserted_tokens(base_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    save_comet(model, tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs["llama"])
    main(["export", "--adapter", str(tmp_path / "adapter"), "--merge", "--out", str(tmp_path / "merged")])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    inserted = list(model.tokens.inserted_ids)
    assert plain.generation_config.suppress_tokens == inserted
    prompt = torch.tensor([IDS[:12]])
    with torch.no_grad():  # make every inserted token the likeliest next token: its head row outscores the others
        hidden = plain.model(prompt).last_hidden_state[0, -1]
        plain.lm_head.weight[inserted] = 100 * hidden / hidden.norm() ** 2
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert plain.generate(prompt, **settings, suppress_tokens=None)[0, 12] in inserted  # unsuppressed: picked
    new = plain.generate(prompt, **settings)[0, 12:].tolist()
    assert len(new) == 6 and not set(new) & set(inserted)


def test_full_finetune_round_trip(base_dirs, tmp_path):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG, FinetuneSettings(method="full"))
    trained_like(model)
    save_comet(model, tokenizer, tmp_path / "full", FinetuneSettings(method="full"), base_dirs["llama"])
    loaded, _, _ = load_comet(tmp_path / "full")
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


def test_loading_onto_another_base_is_refused(base_dirs, tmp_path):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    save_comet(model, tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs["llama"])
    other = init_base(tmp_path / "wide", "llama", hidden_size=32, num_layers=2)
    with pytest.raises(CheckpointMismatchError, match="load it onto the base model it was trained from"):
        load_comet(tmp_path / "adapter", base_model=other)


def test_a_stage_may_change_the_loss_vocabulary_but_not_the_layout(adapter, base_dirs):
    import dataclasses

    from transformers import AutoConfig

    from comet_ds.modeling.pretrained import check_continuable

    saved, _, settings = load_comet(adapter)
    full = dataclasses.replace(saved.config, loss_vocabulary="full")
    check_continuable(adapter, full, settings, AutoConfig.from_pretrained(base_dirs["llama"]), base_dirs["llama"])
    loaded, _, _ = load_comet(adapter, comet=full)
    assert loaded.config.loss_vocabulary == "full" and not loaded.head.loss_excluded.any()
    assert saved.head.loss_excluded.sum() == len(saved.tokens.inserted_ids)
    with pytest.raises(CheckpointMismatchError, match="chunk_size"):
        check_continuable(adapter, dataclasses.replace(full, chunk_size=32), settings,
                          AutoConfig.from_pretrained(base_dirs["llama"]), base_dirs["llama"])


def test_tampered_memory_weights_are_named(base_dirs, tmp_path):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    save_comet(model, tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs["llama"])
    meta = json.loads((tmp_path / "adapter" / COMET_CONFIG).read_text())
    meta["comet"]["temp_stride"] = -1  # the config then says: no temporary memory networks
    meta["comet"]["temp_budget"] = 0
    (tmp_path / "adapter" / COMET_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unexpected .*temp_memory"):
        load_comet(tmp_path / "adapter")


def test_a_failed_save_keeps_the_previous_directory(base_dirs, tmp_path, monkeypatch):
    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    target = tmp_path / "adapter"
    save_comet(model, tokenizer, target, FinetuneSettings(), base_dirs["llama"])
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_comet(trained_like(model), tokenizer, target, FinetuneSettings(), base_dirs["llama"])
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no scratch left behind
    load_comet(target)


def test_unsupported_architecture_is_named(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    from comet_ds.modeling.backbone import load_backbone

    with pytest.raises(UnsupportedModelError, match="model type 'gpt2' is not supported"):
        load_backbone(tmp_path)


def test_chunks_longer_than_the_positions_are_refused(tmp_path):
    base = init_base(tmp_path / "short", "qwen3", num_layers=1, max_positions=32)
    with pytest.raises(CometConfigError, match="supports 32 positions"):
        build_comet(base, CONFIG)


def test_unknown_lora_targets_are_refused(base_dirs):
    with pytest.raises(CometConfigError, match=r"LoRA targets \['c_attn'\]"):
        build_comet(base_dirs["llama"], CONFIG, FinetuneSettings(lora_targets=("q_proj", "c_attn")))


def test_chunks_wider_than_a_sliding_window_are_refused():
    from comet_ds.modeling.backbone import check_fits
    from comet_ds.modeling.tiny_base import tiny_model

    model = tiny_model("mistral", vocab_size=64, num_layers=1)
    model.config.sliding_window = 32
    with pytest.raises(CometConfigError, match="sliding window of 32"):
        check_fits(model, CONFIG)
    model.config.sliding_window = None
    check_fits(model, CONFIG)
