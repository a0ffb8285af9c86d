"""Checkpoints of the CoMeT paper's code: import, export back, and what a model does once imported."""

import json

import pytest
import torch
from helpers import greedy_by_recompute, refusal
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from comet_ds.cli import main
from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
from comet_ds.layout import ChunkLayout
from comet_ds.modeling.pretrained import load_comet

G, C, STRIDE, BUDGET = 4, 16, 5, 6


def official_checkpoint(base: str, out) -> dict:
    """A checkpoint laid out as the paper's code saves one, built from a tiny Qwen3 base: <|memory|> special,
    the beacons plain tokens, the vocabulary padded to a multiple of 256, layers under inner_layer, memory
    networks with weights of their own. Returns its config.json."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|memory|>"]}, replace_extra_special_tokens=False)
    tokenizer.add_tokens([f"<beacon_{i}>" for i in range(G)] + ["<beacon>"])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=256, mean_resizing=False)
    hidden, generator = model.config.hidden_size, torch.Generator().manual_seed(0)

    def noise(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("self_attn", "inner_layer.self_attn").replace("mlp.", "inner_layer.mlp.")
              .replace("input_layernorm", "inner_layer.input_layernorm")
              .replace("post_attention_layernorm", "inner_layer.post_attention_layernorm")] = tensor.clone()
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        state |= {prefix + "global_memory_net.norm.weight": 1 + noise(hidden),
                  prefix + "global_memory_net.g_proj.weight": noise(1, 2 * hidden),
                  prefix + "global_memory_net.o_proj.down_proj.weight": noise(8, hidden),
                  prefix + "global_memory_net.o_proj.up_proj.weight": noise(hidden, 8),
                  prefix + "temp_memory_net.0.weight": 1 + noise(hidden),
                  prefix + "temp_memory_net.1.down_proj.weight": noise(8, hidden),
                  prefix + "temp_memory_net.1.up_proj.weight": noise(hidden, 8)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = model.config.to_dict() | {
        "architectures": ["MemQwen3ForCausalLM"], "chunk_size": C, "temp_beacon_stride": STRIDE,
        "temp_mem_budget": BUDGET, "placeholder_id": tokenizer.convert_tokens_to_ids("<|memory|>"),
        "temp_beacon_id": tokenizer.convert_tokens_to_ids("<beacon>"),
        "global_beacon_ids": tokenizer.convert_tokens_to_ids([f"<beacon_{i}>" for i in range(G)]),
        "pad_token_id": tokenizer.eos_token_id}
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    return config


@pytest.fixture(scope="module")
def checkpoint(base_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "ckpt"
    return path, official_checkpoint(base_dirs["qwen3"], path)


def test_import_then_export_gives_back_every_tensor(checkpoint, tmp_path):
    path, config = checkpoint
    main(["import-official", "--checkpoint", str(path), "--out", str(tmp_path / "imported")])
    main(["export", "--adapter", str(tmp_path / "imported"), "--format", "official", "--out", str(tmp_path / "back")])
    original, back = load_file(path / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in ("chunk_size", "placeholder_id", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget",
                  "global_beacon_ids", "vocab_size", "pad_token_id", "hidden_size", "num_hidden_layers"):
        assert exported[field] == config[field], field


def test_an_imported_model_keeps_ids_and_weights_where_they_belong(checkpoint, tmp_path):
    path, config = checkpoint
    main(["import-official", "--checkpoint", str(path), "--out", str(tmp_path / "imported")])
    model, tokenizer, settings = load_comet(tmp_path / "imported")
    assert settings.method == "full"
    assert (model.config.chunk_size, model.config.global_slots, model.config.temp_stride, model.config.temp_budget) \
        == (C, G, STRIDE, BUDGET)
    assert model.tokens.inserted_ids == (config["placeholder_id"], config["temp_beacon_id"],
                                         *config["global_beacon_ids"])
    text = "the pass key is 12345. remember it"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(path)(text).input_ids
    weights = load_file(path / "model.safetensors")
    memory = model.layers[1].memory
    assert torch.equal(memory.global_memory.gate.weight, weights["model.layers.1.global_memory_net.g_proj.weight"])
    assert torch.equal(memory.global_memory.norm.weight, weights["model.layers.1.global_memory_net.norm.weight"])
    assert torch.equal(memory.temp_memory.norm.weight, weights["model.layers.1.temp_memory_net.0.weight"])
    assert torch.equal(memory.temp_memory.adapter.up.weight,
                       weights["model.layers.1.temp_memory_net.1.up_proj.weight"])
    assert torch.equal(model.layers[1].decoder_layer.self_attn.q_proj.weight,
                       weights["model.layers.1.inner_layer.self_attn.q_proj.weight"])

    prompt = torch.randint(4, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    generated = StreamingGenerator(model).generate(prompt, SamplingSettings(max_new_tokens=24))
    assert generated == greedy_by_recompute(model, prompt, 24)


def test_checkpoints_that_cannot_be_imported_are_refused_before_loading(checkpoint, tmp_path, capsys):
    path, config = checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "temp_mem_budget"}))
    err = refusal(capsys, lambda: main(["import-official", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]))
    assert "lacks the CoMeT fields temp_mem_budget" in err

    (bad / "config.json").write_text(json.dumps(config))
    (bad / "pytorch_model.bin").write_bytes(b"not read")
    err = refusal(capsys, lambda: main(["import-official", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]))
    assert "never a pickle" in err

    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((path / name).read_bytes())
    (bad / "config.json").write_text(json.dumps(config | {"temp_beacon_id": config["placeholder_id"] + 1}))
    err = refusal(capsys, lambda: main(["import-official", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]))
    assert "but its tokenizer has '<beacon_0>' there" in err
    assert not (tmp_path / "o").exists()


def test_a_model_trained_here_comes_back_from_the_papers_layout_unchanged(base_dirs, tmp_path):
    from helpers import finite_logits, trained_like

    from comet_ds.config import CometConfig
    from comet_ds.modeling.finetune import FinetuneSettings
    from comet_ds.modeling.pretrained import build_comet, save_comet

    model, tokenizer = build_comet(base_dirs["qwen3"], CometConfig(chunk_size=C, global_slots=G, temp_stride=STRIDE,
                                                                   temp_budget=BUDGET))
    trained_like(model)
    save_comet(model, tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs["qwen3"])
    main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "official", "--out", str(tmp_path / "paper")])
    assert json.loads((tmp_path / "paper" / "config.json").read_text())["vocab_size"] % 256 == 0
    main(["import-official", "--checkpoint", str(tmp_path / "paper"), "--out", str(tmp_path / "back")])
    back, _, _ = load_comet(tmp_path / "back")
    chunks = ChunkLayout(model.config, model.tokens).layout([list(range(10, 80))])
    with torch.no_grad():
        expected = finite_logits(model(chunks, return_logits=True).logits)
        got = finite_logits([c[..., :len(tokenizer)] for c in back(chunks, return_logits=True).logits])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_refuses_what_the_papers_code_cannot_run(base_dirs, adapter, tmp_path, capsys):
    err = refusal(capsys, lambda: main(["export", "--adapter", str(adapter), "--format", "official",
                                        "--out", str(tmp_path / "o")]))
    assert "runs Qwen3 models only; this one is a llama" in err
