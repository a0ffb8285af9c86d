"""Run under torchrun by tests/test_pipeline.py: one DeepSpeed pipeline step against the single-process
layer-major reference on the same weights and data. Rank 0 writes the comparison as JSON."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology  # noqa: E402
from helpers import trained_like  # noqa: E402  (this script's folder is on its path)

from comet_ds.config import CometConfig  # noqa: E402
from comet_ds.layout import ChunkLayout  # noqa: E402
from comet_ds.layout.plan import random_sizes, right_aligned_sizes, uniform_sizes  # noqa: E402
from comet_ds.modeling.finetune import FinetuneSettings  # noqa: E402
from comet_ds.modeling.pretrained import build_comet  # noqa: E402
from comet_ds.pipeline.engine import CometPipelineEngine, skip_shm_build  # noqa: E402
from comet_ds.pipeline.stages import build_pipeline_module  # noqa: E402

# 4 beacons per chunk, queue of 6: eviction from the third chunk on.
CONFIG = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=6)


def groups_per_replica(vocab: int, replicas: int, groups: int) -> list[list[list[list[int]]]]:
    """Per data-parallel replica, `groups` batches of 2 sequences of different lengths (>= 4 chunks)."""
    g = torch.Generator().manual_seed(1)
    lengths = [(75, 50), (66, 40), (80, 20), (70, 64)]
    assert replicas * groups <= len(lengths)
    return [[[torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths[r * groups + i]]
             for i in range(groups)] for r in range(replicas)]


def plans(batch: list[list[int]], chunk_plan: str) -> list[list[int]] | None:
    """None (full chunks and a remainder), or for "mixed" the planner's other strategies in turn: short chunks
    before the last, chunks of random sizes (more chunks than the fixed plan), equal sizes."""
    if chunk_plan == "fixed":
        return None
    rng = random.Random(0)
    strategies = [lambda n: right_aligned_sizes(n, CONFIG.chunk_size),
                  lambda n: random_sizes(n, CONFIG.chunk_size, 7, rng),
                  lambda n: uniform_sizes(n, 6)]
    return [strategies[i % len(strategies)](len(ids)) for i, ids in enumerate(batch)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--bptt-window", type=int, default=0)
    parser.add_argument("--accumulation", type=int, default=1, help="sequence groups per optimizer step")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--reference-window", type=int, default=-1,
                        help="BPTT window of the reference (default: the pipeline's); a mismatch must be caught")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1])
    parser.add_argument("--chunk-plan", default="fixed", choices=["fixed", "mixed"],
                        help="mixed: every sequence cut by a planner strategy other than fixed")
    parser.add_argument("--loss-vocabulary", default="text", choices=["text", "full"])
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    replicas = world // args.stages
    window = args.bptt_window or None
    reference_window = window if args.reference_window < 0 else (args.reference_window or None)

    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, loss_vocabulary=args.loss_vocabulary)
    model, tokenizer = build_comet(args.base, config, FinetuneSettings(method=args.method))
    trained_like(model, seed=2)
    reference = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}

    layout = ChunkLayout(config, model.tokens)
    data = groups_per_replica(len(tokenizer) - CONFIG.global_slots - 2, replicas, args.accumulation)
    all_groups = [[layout.layout(batch, text_chunk_sizes=plans(batch, args.chunk_plan)) for batch in groups]
                  for groups in data]
    total_labels = sum(c.num_labels for groups in all_groups for chunks in groups for c in chunks)

    # single-process reference over every replica's data, one sequence group after another: one global token mean
    ref_sum = sum(reference(chunks, bptt_window=reference_window).loss_sum
                  for groups in all_groups for chunks in groups)
    (ref_sum / total_labels).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    topology = PipeDataParallelTopology(num_pp=args.stages, num_dp=replicas)
    module = build_pipeline_module(model, args.stages, topology=topology)
    trainable = [p for p in module.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": args.zero}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    # ZeRO-1 keeps gradients in its own buffers, so its gradients are read from one SGD step instead:
    # with a large learning rate, (before - after) / lr is the gradient to float32 precision
    lr = 0.0 if args.zero == 0 else 1e4
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(trainable, lr=lr), config=config)
    engine = CometPipelineEngine.adopt(engine, window)
    snapshot: dict[str, torch.Tensor] = {}
    take_step = engine._take_model_step

    def snapshot_then_step(*a, **k):
        snapshot.update({names[id(p)]: p.grad.clone() for p in module.parameters() if p.grad is not None})
        return take_step(*a, **k)

    engine._take_model_step = snapshot_then_step
    before = {names[id(p)]: p.detach().clone() for p in trainable}
    my_replica = engine.grid.get_data_parallel_id()
    loss = engine.train_step(all_groups[my_replica], loss_scale=replicas / total_labels)
    if args.zero == 1:
        snapshot = {names[id(p)]: (before[names[id(p)]] - p.detach()) / lr for p in trainable}

    worst, compared, memory_grads = 0.0, 0, 0
    for name, grad in snapshot.items():
        ref = ref_grads[name]
        worst = max(worst, ((grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item())
        compared += 1
        memory_grads += int(".memory." in name and grad.abs().sum() > 0)
    stats = torch.tensor([worst, compared, memory_grads], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if dist.get_rank() == 0:
        result = {"loss_pipeline": float(loss), "loss_reference": (ref_sum / total_labels).item(),
                  "max_rel_grad_err": max(s[0].item() for s in gathered),
                  "compared_per_rank": [int(s[1]) for s in gathered],
                  "memory_grads_per_rank": [int(s[2]) for s in gathered],
                  "trainable_tensors": len(ref_grads),
                  "chunks": [[len(c) for c in groups] for groups in all_groups]}
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
