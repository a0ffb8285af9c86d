"""The model core on a CUDA device, and `comet-ds bench gpu`, the command that measures it there.

The CUDA tests (the same numbers as on the CPU, bf16 training, streaming generation, the chunk's masks and
the kernels they reach) skip where torch sees no CUDA device, as in CI. The benchmark's own tests run
everywhere: its `tiny` shape runs the same code on a CPU in seconds.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ENV, REPO, greedy_by_recompute, refusal, trained_like
from test_generate import CONFIG, perturbed
from test_model import CONFIG as MODEL_CONFIG
from test_model import LAYOUTS, additive_mask, loss_logits_gradients, sequences

from comet_ds.bench.gpu import (
    SHAPES,
    BenchSettings,
    Budget,
    Results,
    build_model,
    measure_full_attention_prefill,
    measure_kernels,
    windowed_train_step,
)
from comet_ds.cli import main
from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
from comet_ds.layout import ChunkLayout
from comet_ds.modeling import layer as layer_module
from comet_ds.modeling.pretrained import build_comet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sequence(length: int, vocab: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (length,), generator=g).tolist()
    return ids, ids


def loss_and_gradients(base_dir: str, device: str, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, _ = build_comet(base_dir, CONFIG)
    model = perturbed(model).to(device, dtype)
    ids, labels = sequence(90, 300)
    out = model(ChunkLayout(CONFIG, model.tokens).iter_chunks([ids], [labels]))
    out.loss.backward()
    return out.loss.item(), {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.requires_grad}


def worst_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in reference.items())


@cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_loss_and_gradients_are_as_exact_as_the_cpu(base_dirs, arch):
    """Both fp32 runs against a CPU float64 reference: the GPU may round differently, not worse.

    (With the perturbed weights fp32 itself strays well away from float64 on the Llama base, CPU
    included, so a fixed CPU-vs-GPU tolerance would measure the conditioning rather than the device code.)
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_loss, reference = loss_and_gradients(base_dirs[arch], "cpu", torch.float64)
    cpu_loss, cpu_grads = loss_and_gradients(base_dirs[arch], "cpu", torch.float32)
    gpu_loss, gpu_grads = loss_and_gradients(base_dirs[arch], "cuda", torch.float32)
    assert gpu_grads.keys() == reference.keys()
    assert abs(gpu_loss - ref_loss) <= max(10 * abs(cpu_loss - ref_loss), 1e-5 * abs(ref_loss))
    assert worst_relative_error(gpu_grads, reference) <= max(10 * worst_relative_error(cpu_grads, reference), 1e-4)


@cuda
def test_bf16_lora_step_on_cuda_trains_only_the_adapters(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG, dtype=torch.bfloat16)
    model = model.cuda()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, labels = sequence(90, 300)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA A gets no gradient while B is still zero: the second step moves it
        out = model(ChunkLayout(CONFIG, model.tokens).iter_chunks([ids], [labels]))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert sum(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained) == len(trained)


@cuda
@pytest.mark.parametrize("prompt_length", [5, 37])
def test_greedy_generation_on_cuda_equals_the_reference_and_the_cpu(base_dirs, prompt_length):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    model = perturbed(model)
    prompt = list(range(10, 10 + prompt_length))
    settings = SamplingSettings(max_new_tokens=40)  # crosses chunk roll-overs
    on_cpu = StreamingGenerator(model).generate(prompt, settings)
    model.cuda()
    on_gpu = StreamingGenerator(model).generate(prompt, settings)
    assert on_gpu == on_cpu
    assert on_gpu[:12] == greedy_by_recompute(model, prompt, 12)


@cuda
def test_sampling_on_cuda_is_reproducible(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(perturbed(model).cuda())
    settings = SamplingSettings(max_new_tokens=20, do_sample=True, top_p=0.9, seed=7)
    assert generator.generate([11, 12, 13], settings) == generator.generate([11, 12, 13], settings)


@cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunk_masks_on_cuda_equal_the_additive_mask_in_bf16(base_dirs, arch, monkeypatch):
    """On CUDA the chunks without a mask reach other kernels than the additive float mask did (flash rather
    than memory-efficient attention): the same function, rounded otherwise."""
    model, tokenizer = build_comet(base_dirs[arch], MODEL_CONFIG)
    model = trained_like(model).to("cuda", torch.bfloat16)
    chunks = ChunkLayout(MODEL_CONFIG, model.tokens).layout(sequences(tokenizer, lengths=LAYOUTS["two sequences"]))
    loss, logits, grads = loss_logits_gradients(model, chunks)
    monkeypatch.setattr(layer_module, "chunk_attention_mask", lambda roles: additive_mask(roles, torch.bfloat16))
    ref_loss, ref_logits, ref_grads = loss_logits_gradients(model, chunks)
    attended = torch.cat([c.attention_mask for c in chunks], dim=1).bool().cuda()
    bf16 = {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(loss, ref_loss, **bf16)
    torch.testing.assert_close(logits[attended], ref_logits[attended], **bf16)
    assert not torch.isnan(logits).any()
    for name, grad in ref_grads.items():
        error = (grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert error <= 3e-2, name


@cuda
def test_chunks_reach_a_fused_sdpa_kernel_on_cuda(tmp_path):
    """A chunk without a mask reaches flash (or cuDNN), as full attention does; which kernel a masked chunk
    reaches is recorded, not required (it depends on the torch release and the chunk's length)."""
    results = Results(tmp_path)
    settings = BenchSettings(shape="tiny", lengths=(256,), device="cuda", repeats=1)
    measure_kernels(build_model(SHAPES["tiny"], "cuda", torch.bfloat16), SHAPES["tiny"], settings, results)
    kernels = {row["case"]: row["kernels"] for row in results.data["attention"]}
    assert all(kernels.values()), kernels
    assert set(kernels["no mask (causal), a stream's chunk"]) <= {"flash", "cuDNN"}, kernels
    assert set(kernels["Hugging Face full attention, 256 tokens"]) <= {"flash", "cuDNN"}, kernels


# -- comet-ds bench gpu ------------------------------------------------------------------------------------------


def test_windowed_train_step_makes_the_update_of_bptt_window_backprop(base_dirs):
    """A backward per window of chunks (bounded memory) updates the weights as one backward over
    `model(chunks, bptt_window=k)` does."""
    model, tokenizer = build_comet(base_dirs["llama"], MODEL_CONFIG)
    trained_like(model)
    chunks = ChunkLayout(MODEL_CONFIG, model.tokens).layout(sequences(tokenizer, lengths=(80,)))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    reference = model(chunks, bptt_window=2)
    reference.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    loss = windowed_train_step(model, chunks, optimizer, bptt_window=2)
    assert loss == pytest.approx(reference.loss.item(), rel=1e-6)
    moved = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), stepped[n], rtol=1e-5, atol=1e-7)
        moved += not torch.equal(stepped[n], start[n])
    assert moved == len(trainable)


NOT_ON_THE_GPU_MACHINE = ("deepspeed", "datasets", "mlflow")

# a prelude that makes a Python process see none of those, as on the GPU machine: every finder on
# sys.meta_path answers "not found" for them, so `import` fails and importlib.util.find_spec returns None
HIDE_PACKAGES = f"""
import sys
class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_ON_THE_GPU_MACHINE!r}:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)
sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
"""


def test_the_gpu_tests_import_without_what_the_gpu_machine_lacks():
    # conftest's tiny bases come from comet_ds.modeling.tiny_base
    script = HIDE_PACKAGES + "import sys\nsys.path.insert(0, 'tests')\nimport test_gpu, comet_ds.modeling.tiny_base\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_gpu_runs_end_to_end_at_the_tiny_shape_on_the_cpu(tmp_path):
    """The command the GPU runs, at the tiny shape on the CPU, where DeepSpeed, datasets and MLflow cannot
    be imported (the GPU machine has none of them): every section measured and written."""
    out = tmp_path / "bench"
    args = ["bench", "gpu", "--shape", "tiny", "--device", "cpu", "--lengths", "128,256", "--decode-tokens", "3",
            "--train-full", "128", "--train-windowed", "256", "--bptt-window", "2", "--baseline-train-lengths",
            "128", "--repeats", "1", "--out", str(out)]
    script = HIDE_PACKAGES + f"from comet_ds.cli import main\nmain({args!r})\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["device"] == "cpu" and results["shape_config"]["comet"]["chunk_size"] == 64
    attention = {row["case"]: row for row in results["attention"]}
    assert len(attention) == 5 and all(row["kernels"] for row in attention.values())
    assert all(row["forward_ms"] > 0 and row["forward_backward_ms"] > 0 for name, row in attention.items()
               if not name.startswith("Hugging Face"))
    prefill = {(row["system"], row["tokens"]): row for row in results["prefill"]}
    assert set(prefill) == {(system, n) for system in ("comet", "full attention") for n in (128, 256)}
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_mib"] > 0 for row in prefill.values())
    assert {row["system"]: row["after_tokens"] for row in results["decode"]} == {"comet": 256, "full attention": 256}
    assert all(row["steps"] == 2 and 0 < row["ms_per_token_median"] <= row["ms_slowest_step"]
               for row in results["decode"])
    training = {(row["system"], row["bptt_window"]): row["tokens"] for row in results["training"] if "seconds" in row}
    assert training == {("comet", "full"): 128, ("comet", 2): 256, ("full attention", "-"): 128}
    assert [row["tokens"] for row in results["summary"]["prefill"]] == [128, 256]
    assert (out / "prefill.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0


def test_bench_gpu_skips_what_the_budget_cannot_hold_and_says_so(tmp_path):
    results = Results(tmp_path)
    settings = BenchSettings(shape="tiny", lengths=(128, 256), device="cpu")
    measure_full_attention_prefill(None, SHAPES["tiny"], settings, Budget(0.0), results)  # spent: nothing runs
    assert [row["status"] for row in results.data["prefill"]] == ["skipped: over the time budget"] * 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--decode-tokens", "1"], "--decode-tokens must be >= 2"),
    (["--train-windowed", "32k", "--bptt-window", "16"], "--train-windowed 32768 tokens are 16 chunks"),
])
def test_bench_gpu_refuses_bad_settings_in_one_line(argv, message, tmp_path, capsys):
    err = refusal(capsys, lambda: main(["bench", "gpu", "--device", "cpu", "--out", str(tmp_path / "o"), *argv]))
    assert message in err
    assert not (tmp_path / "o").exists()  # refused before anything is built or written


def test_bench_gpu_offers_the_shapes_it_knows(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "gpu", "--shape", "qwen3-7b", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qwen3-7b' (choose from 'qwen3-0.6b', 'qwen3-4b', 'tiny')" in capsys.readouterr().err
