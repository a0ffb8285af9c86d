"""Streaming generation against a full recompute of the whole sequence at every step."""

import pytest
import torch
from helpers import greedy_by_recompute, trained_like

from comet_ds.config import CometConfig
from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
from comet_ds.layout import ChunkLayout, Role
from comet_ds.modeling.pretrained import build_comet

# stride 5 does not divide C=16 (a trailing beacon per chunk); Q=6 evicts
CONFIG = CometConfig(chunk_size=16, global_slots=4, temp_stride=5, temp_budget=6)


def perturbed(model):
    """Weights moved far from their init: after trained_like's smaller default step the greedy
    continuations of the random base repeat one token, which would hide a token fed at the wrong place."""
    return trained_like(model, scale=0.3, seed=3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("prompt_length", [5, 16, 37])
def test_greedy_generation_equals_the_step_by_step_reference(base_dirs, arch, prompt_length):
    model, _ = build_comet(base_dirs[arch], CONFIG)
    perturbed(model)
    prompt = torch.randint(4, 800, (prompt_length,), generator=torch.Generator().manual_seed(prompt_length)).tolist()
    steps = 40  # rolls over into at least two new chunks
    assert StreamingGenerator(model).generate(prompt, SamplingSettings(max_new_tokens=steps)) == \
        greedy_by_recompute(model, prompt, steps)


def test_beacon_cadence_in_decoding_matches_the_training_layout(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(model)
    fed: dict[int, list[int]] = {}
    run = generator._run

    def recording_run(chunk, ids, replace_inputs=None, keep_layer_outputs=False):
        if replace_inputs is None:  # slot prefill excluded: text, beacons and global beacons only
            fed.setdefault(chunk.index, []).extend(ids[0].tolist())
        return run(chunk, ids, replace_inputs, keep_layer_outputs)

    generator._run = recording_run
    prompt = list(range(10, 17))
    new = generator.generate(prompt, SamplingSettings(max_new_tokens=30))
    chunks = ChunkLayout(CONFIG, model.tokens).layout([prompt + new])
    for chunk in chunks:
        roles, ids = chunk.roles[0], chunk.input_ids[0]
        keep = (roles == Role.TEXT) | (roles == Role.TEMP_BEACON) | (roles == Role.GLOBAL_BEACON)
        expected = ids[keep].tolist()
        if chunk.index == len(chunks) - 1:  # the open chunk: up to its last text token (+ its beacon)
            expected = expected[: len(fed[chunk.index])]
        assert fed[chunk.index] == expected, chunk.index


def test_generation_rolls_over_without_limit(base_dirs):
    model, tokenizer = build_comet(base_dirs["qwen3"], CONFIG)
    new = StreamingGenerator(perturbed(model)).generate([5, 6, 7], SamplingSettings(max_new_tokens=100))
    assert len(new) == 100  # six chunk roll-overs
    assert not set(new) & set(model.tokens.inserted_ids)
    assert all(0 <= t < len(tokenizer) for t in new)


def test_sampling_is_reproducible_from_the_seed(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(perturbed(model))
    settings = SamplingSettings(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=4)
    first = generator.generate([5, 6, 7], settings)
    assert first == generator.generate([5, 6, 7], settings)
    assert first != generator.generate([5, 6, 7], SamplingSettings(max_new_tokens=20, do_sample=True, seed=5))


def test_stop_tokens_end_generation(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(perturbed(model))
    free = generator.generate([5, 6, 7], SamplingSettings(max_new_tokens=10))
    stopped = generator.generate([5, 6, 7], SamplingSettings(max_new_tokens=10, stop_token_ids=(free[2],)))
    assert stopped == free[: free.index(free[2]) + 1]


def test_prefill_then_decode_is_generate_and_shows_each_token_as_it_comes(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(perturbed(model))
    prompt, settings = list(range(10, 47)), SamplingSettings(max_new_tokens=20)  # crosses a chunk roll-over
    seen = []
    out = generator.decode(generator.prefill(prompt), settings, on_token=seen.append)
    assert out == seen == generator.generate(prompt, settings)


def test_a_batch_of_prompts_is_read_as_each_prompt_alone(base_dirs):
    """Prompts of 40 and 45 tokens share their 2 complete chunks' batched forward, 5 and 60 tokens do
    not (none, 3): each prompt's memories, open chunk and logits are its own, and so is its continuation."""
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    perturbed(model)
    generator = StreamingGenerator(model)
    prompts = [torch.randint(4, 800, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (40, 5, 45, 60)]
    settings = SamplingSettings(max_new_tokens=20)
    batch = generator.prefill_batch(prompts)
    for prompt, together in zip(prompts, batch, strict=True):
        alone = generator.prefill(prompt)
        assert (together.chunk.index, together.chunk.length) == (alone.chunk.index, alone.chunk.length)
        torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
        for mine, reference in zip(together.states, alone.states, strict=True):
            for x, y in zip(mine or (), reference or (), strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert generator.decode(together, settings) == generator.decode(alone, settings)


def test_generate_command_writes_jsonl(base_dirs, tmp_path, capsys):
    import json

    from comet_ds.cli import main
    from comet_ds.modeling.finetune import FinetuneSettings
    from comet_ds.modeling.pretrained import save_comet

    model, tokenizer = build_comet(base_dirs["llama"], CONFIG)
    save_comet(perturbed(model), tokenizer, tmp_path / "adapter", FinetuneSettings(), base_dirs["llama"])
    (tmp_path / "prompts.jsonl").write_text('{"id": 1, "prompt": "The pass key is"}\n{"prompt": "Here we go."}\n')
    main(["generate", "--model", str(tmp_path / "adapter"), "--prompts", str(tmp_path / "prompts.jsonl"),
          "--max-new-tokens", "20", "--ignore-eos", "--output", str(tmp_path / "out.jsonl")])
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None] and all(r["new_tokens"] == 20 for r in rows)
    expected = StreamingGenerator(model).generate(tokenizer("The pass key is").input_ids,
                                                  SamplingSettings(max_new_tokens=20))
    assert rows[0]["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    main(["generate", "--model", str(tmp_path / "adapter"), "--prompt", "Here we go.", "--max-new-tokens", "20",
          "--ignore-eos"])
    assert capsys.readouterr().out.strip().endswith(rows[1]["completion"].strip())
