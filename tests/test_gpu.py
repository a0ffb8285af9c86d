"""The model core on a CUDA device: the same numbers as on the CPU, bf16 training, streaming generation.

CI has no GPU, so these skip there; they run wherever torch sees a CUDA device.
"""

import pytest
import torch
from test_generate import CONFIG, perturbed, reference_greedy

from comet_ds.infer.generate import SamplingSettings, StreamingGenerator
from comet_ds.layout import ChunkLayout
from comet_ds.modeling.pretrained import build_comet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
    assert on_gpu[:12] == reference_greedy(model, prompt, 12)


def test_sampling_on_cuda_is_reproducible(base_dirs):
    model, _ = build_comet(base_dirs["llama"], CONFIG)
    generator = StreamingGenerator(perturbed(model).cuda())
    settings = SamplingSettings(max_new_tokens=20, do_sample=True, top_p=0.9, seed=7)
    assert generator.generate([11, 12, 13], settings) == generator.generate([11, 12, 13], settings)
