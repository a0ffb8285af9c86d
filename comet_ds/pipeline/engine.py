"""DeepSpeed's PipelineEngine running the chunk schedule: one optimizer step over one or more sequence groups."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import deepspeed.comm as dist
import torch
from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from comet_ds.layout import Chunk
from comet_ds.pipeline.schedule import ChunkSchedule, StepPlan
from comet_ds.pipeline.stages import CometPipelineModule
from comet_ds.resources import peak_memory_mib, reset_peak_memory
from data_prep import memory


def skip_shm_build() -> None:
    """Skip DeepSpeed's slow JIT build of its shared-memory op on CPU machines (gloo does the work)."""
    import deepspeed.comm.torch  # noqa: F401  (the submodule; `deepspeed.comm.torch` the name is torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# on CPU a long sequence frees its activations window after window between long-lived tensors, so
# returning the pages after every BPTT window keeps resident memory flat; on a GPU they are device memory
release_free_memory = memory.release_free_memory if not torch.cuda.is_available() else (lambda: None)


class CometPipelineEngine(PipelineEngine):
    """PipelineEngine with the chunk schedule; set on the engine that deepspeed.initialize returns.

    `train_step(groups, scale)` runs one optimizer step over the chunks of one or more batches of
    sequences (gradient accumulation); the number of chunks may change from group to group and step to step.
    """

    bptt_window: int | None = None
    _compute_seconds = 0.0
    _plan = StepPlan(0)

    @classmethod
    def adopt(cls, engine: PipelineEngine, bptt_window: int | None) -> CometPipelineEngine:
        if not isinstance(engine.module, CometPipelineModule):
            raise TypeError("the engine must wrap a CometPipelineModule")
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
        reset_peak_memory()

    def stage_stats(self, step_seconds: float) -> dict[str, Any]:
        """Collective: every stage's idle fraction of the step and peak memory since the timer reset."""
        local = torch.tensor([float(self.stage_id), 1.0 - self._compute_seconds / step_seconds, peak_memory_mib()])
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        peak = [0.0] * self.num_stages
        for stage, _, mib in gathered:
            peak[int(stage)] = max(peak[int(stage)], float(mib))
        return {"bubble_fraction": sum(float(g[1]) for g in gathered) / len(gathered), "peak_mem_mib": peak}

    def _train_schedule(self) -> ChunkSchedule:
        return ChunkSchedule(self._plan, self.num_stages, self.stage_id)

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
        ds.ForwardPass: _exec_forward_pass,
        ds.BackwardPass: _exec_backward_pass,
    }
