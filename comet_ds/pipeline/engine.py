"""DeepSpeed's PipelineEngine running the chunk schedule: one optimizer step over one or more sequence groups.

This is the one module that relies on DeepSpeed beyond its public API: the engine's private hooks it
overrides, the shared-memory op it skips on CPU, and the partition rule the dry run previews. At import
it checks that they exist (`check_deepspeed`), so another DeepSpeed fails here with the versions this
was tested on rather than deep inside a training step. The schedule uses DeepSpeed's PipeSchedule and
instruction classes, its interface for custom schedules.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from comet_ds.layout import Chunk
from comet_ds.pipeline.schedule import BlockSchedule, ChunkSchedule, StepPlan
from comet_ds.pipeline.stages import CometPipelineModule, pipeline_layer_order
from comet_ds.resources import peak_memory_mib, reset_peak_memory
from data_prep import memory

# the DeepSpeed releases this module was tested with; setup.cfg requires the same (tests/test_packaging.py)
SUPPORTED_DEEPSPEED = ">=0.19.8,<0.20"

# attributes of a built engine that the overrides below read or write
ENGINE_STATE = ("micro_batches", "pipe_buffers", "loss", "stage_id", "num_stages")

# what the engine below relies on, by owner: overridden or called private methods, the instruction table it
# extends, the op it skips, and the partition functions the dry run calls
DEEPSPEED_HOOKS: dict[str, tuple[str, ...]] = {
    "PipelineEngine": ("_exec_forward_pass", "_exec_backward_pass", "_INSTRUCTION_MAP", "_train_schedule",
                       "train_batch"),
    "deepspeed.runtime.pipe.schedule": ("PipeSchedule", "LoadMicroBatch", "ForwardPass", "BackwardPass",
                                        "SendActivation", "RecvActivation", "SendGrad", "RecvGrad",
                                        "ReduceTiedGrads", "ReduceGrads", "OptimizerStep"),
    "deepspeed.comm.torch": ("build_shm_op",),
    "deepspeed.runtime.utils": ("partition_uniform", "partition_balanced"),
}


def missing_deepspeed_hooks(owners: dict[str, Any]) -> list[str]:
    """The names in DEEPSPEED_HOOKS that `owners` (owner name -> class or module) lack, as owner.name."""
    return [f"{owner}.{name}" for owner, names in DEEPSPEED_HOOKS.items() for name in names
            if not hasattr(owners[owner], name)]


def check_deepspeed(owners: dict[str, Any], version: str) -> None:
    """Refuse a DeepSpeed without the hooks this module relies on, naming the releases it supports."""
    _refuse_missing(missing_deepspeed_hooks(owners), version)


def _refuse_missing(missing: list[str], version: str) -> None:
    if missing:
        raise ImportError(f"DeepSpeed {version} lacks {', '.join(missing)}, which comet_ds's pipeline engine relies "
                          f"on; install a supported release: pip install 'deepspeed{SUPPORTED_DEEPSPEED}'")


def _installed_owners() -> dict[str, Any]:
    # import_module gives the submodule: the attribute `deepspeed.comm.torch` is the torch package
    return {"PipelineEngine": PipelineEngine, "deepspeed.runtime.pipe.schedule": ds,
            "deepspeed.comm.torch": importlib.import_module("deepspeed.comm.torch"),
            "deepspeed.runtime.utils": ds_utils}


check_deepspeed(_installed_owners(), deepspeed.__version__)


def skip_shm_build() -> None:
    """Skip DeepSpeed's slow JIT build of its shared-memory op on CPU machines (gloo does the work)."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def stage_partition(method: str, stages: int, num_layers: int, layer_weight: int,
                    inserted_rows_weight: int) -> list[list[str]]:
    """The pipeline layers each stage gets, by the rule DeepSpeed applies (weights as it counts them:
    trainable parameters for "parameters", decoder layers for "layers")."""
    names = pipeline_layer_order("token embedding", "inserted rows", [f"layer {i}" for i in range(num_layers)],
                                 "final norm", "loss")
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(names), num_parts=stages)
    else:
        by_parameters = method == "parameters"
        weights = pipeline_layer_order(0, inserted_rows_weight if by_parameters else 0,
                                       [layer_weight if by_parameters else 1] * num_layers, 0, 0)
        parts = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    return [names[parts[s]:parts[s + 1]] for s in range(stages)]


# on CPU a long sequence frees its activations window after window between long-lived tensors, so
# returning the pages after every BPTT window keeps resident memory flat; on a GPU they are device memory
release_free_memory = memory.release_free_memory if not torch.cuda.is_available() else (lambda: None)


TRANSFERS = (ds.SendActivation, ds.RecvActivation, ds.SendGrad, ds.RecvGrad)


def _timed_transfer(handler: Any) -> Any:
    """The engine's handler of a send or receive, adding its time to the stage's transfer seconds."""
    def timed(engine: CometPipelineEngine, *args: Any, **kwargs: Any) -> None:
        begin = time.perf_counter()
        handler(engine, *args, **kwargs)
        engine._transfer_seconds += time.perf_counter() - begin
    return timed


class CometPipelineEngine(PipelineEngine):
    """PipelineEngine with the chunk schedule; set on the engine that deepspeed.initialize returns.

    `train_step(groups, scale)` runs one optimizer step over the chunks of one or more batches of
    sequences (gradient accumulation); the number of chunks may change from group to group and step to step.
    """

    bptt_window: int | None = None
    schedule: type[BlockSchedule] = ChunkSchedule  # `comet-ds bench pipeline` times the draining one against it
    _compute_seconds = 0.0
    _transfer_seconds = 0.0
    _plan = StepPlan(0)

    @classmethod
    def adopt(cls, engine: PipelineEngine, bptt_window: int | None) -> CometPipelineEngine:
        if not isinstance(engine.module, CometPipelineModule):
            raise TypeError("the engine must wrap a CometPipelineModule")
        _refuse_missing([f"PipelineEngine().{name}" for name in ENGINE_STATE if not hasattr(engine, name)],
                        deepspeed.__version__)
        engine.__class__ = cls
        engine.bptt_window = bptt_window
        return engine

    def train_step(self, groups: Sequence[Sequence[Chunk]], loss_scale: float) -> torch.Tensor:
        """One optimizer step over the chunks of each group of sequences, group after group (micro-batch m is
        the m-th chunk in that order); the loss of a chunk is its summed cross-entropy times `loss_scale`.
        Returns the step's loss as DeepSpeed aggregates it: the sum over chunks."""
        scale = torch.tensor(loss_scale, dtype=torch.float32)
        batches = [((c.input_ids, c.roles, c.labels), scale) for chunks in groups for c in chunks]
        self._plan = StepPlan.of([len(chunks) for chunks in groups], self.bptt_window)
        self.micro_batches = len(batches)
        self.module.start_step(self._plan)
        self._losses_by_buffer: dict[int, torch.Tensor] = {}
        self._chunk_of_buffer: dict[int, int] = {}
        self._forwards = 0
        try:
            return self.train_batch(iter(batches))
        finally:
            self.module.start_step(None)

    # -- per-stage timing and memory, for the bubble fraction and peak-memory metrics -------------

    def reset_stage_timers(self) -> None:
        self._compute_seconds = 0.0
        self._transfer_seconds = 0.0
        reset_peak_memory()

    def stage_stats(self, step_seconds: float) -> dict[str, Any]:
        """Collective, over the time since the timer reset (`step_seconds` long): per stage, the share spent in
        forwards and backwards (compute) and in sends and receives (transfer: a receive includes the wait for
        the neighbouring stage, so a stage that waits on a slower one shows it here), averaged over the
        stage's data-parallel replicas, and its peak memory; bubble_fraction is 1 - compute, averaged over
        the stages."""
        local = torch.tensor([float(self.stage_id), self._compute_seconds / step_seconds,
                              self._transfer_seconds / step_seconds, peak_memory_mib()])
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        compute, transfer, peak = ([0.0] * self.num_stages for _ in range(3))
        replicas = [0] * self.num_stages
        for stage, busy, moving, mib in (row.tolist() for row in gathered):
            stage = int(stage)
            compute[stage] += busy
            transfer[stage] += moving
            replicas[stage] += 1
            peak[stage] = max(peak[stage], mib)
        compute = [c / n for c, n in zip(compute, replicas)]
        return {"bubble_fraction": 1.0 - sum(compute) / len(compute), "compute_fraction": compute,
                "transfer_fraction": [t / n for t, n in zip(transfer, replicas)], "peak_mem_mib": peak}

    def _train_schedule(self) -> BlockSchedule:
        return self.schedule(self._plan, self.num_stages, self.stage_id)

    # The stock engine keeps only the latest micro-batch's loss, which its 1F1B consumes at once; here a
    # block's forwards run ahead of its backwards, so each buffer keeps its own loss until its backward.
    def _exec_forward_pass(self, buffer_id: int) -> None:
        begin = time.perf_counter()
        super()._exec_forward_pass(buffer_id)
        self._compute_seconds += time.perf_counter() - begin
        self._chunk_of_buffer[buffer_id] = self._forwards  # forwards run in micro-batch order
        self._forwards += 1
        if self.is_last_stage() and self._compute_loss:
            self._losses_by_buffer[buffer_id] = self.loss
            if self.module.training:
                # DeepSpeed keeps every micro-batch's loss for evaluation; in training that list only
                # grows (one small tensor per chunk pins memory on a million-token step)
                self.fwd_outputs.clear()

    def _exec_backward_pass(self, buffer_id: int) -> None:
        if self.is_last_stage():
            self.loss = self._losses_by_buffer.pop(buffer_id)
        begin = time.perf_counter()
        super()._exec_backward_pass(buffer_id)
        self._compute_seconds += time.perf_counter() - begin
        if self._plan.starts_block(self._chunk_of_buffer.pop(buffer_id)):  # a block is done: its activations are free
            release_free_memory()

    _INSTRUCTION_MAP: dict[Any, Any] = {  # noqa: RUF012  (a class table, as in the parent)
        **PipelineEngine._INSTRUCTION_MAP,
        **{kind: _timed_transfer(PipelineEngine._INSTRUCTION_MAP[kind]) for kind in TRANSFERS},
        ds.ForwardPass: _exec_forward_pass,
        ds.BackwardPass: _exec_backward_pass,
    }
