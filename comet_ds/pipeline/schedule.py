"""The training schedule: micro-batch t is chunk t; forwards in chunk order, backwards in reverse.

Stage s runs chunk t while stage s+1 runs chunk t-1, so stages overlap on different chunks; the
memory recurrence never leaves a stage. With a BPTT window of k chunks the schedule runs k forwards,
then those k backwards from the last to the first, then the next window, keeping only k chunks of
activations alive per stage. Gradients are reduced and the optimizer steps once, after the last window.
Each send has its matching receive issued in the same order on both sides, so blocking p2p is safe.
"""

from __future__ import annotations

from collections.abc import Iterator

from deepspeed.runtime.pipe import schedule as ds


class ChunkSchedule(ds.PipeSchedule):
    def __init__(self, micro_batches: int, stages: int, stage_id: int, window: int | None = None):
        super().__init__(micro_batches, stages, stage_id)
        self.window = min(window or micro_batches, micro_batches)

    def num_pipe_buffers(self) -> int:
        return self.window

    def steps(self) -> Iterator[list[ds.PipeInstruction]]:
        first_in_last_window = (self.micro_batches - 1) // self.window * self.window
        for start in range(0, self.micro_batches, self.window):
            chunks = range(start, min(start + self.window, self.micro_batches))
            for chunk in chunks:
                buffer = chunk - start
                cmds: list[ds.PipeInstruction] = []
                if not self.is_first_stage:
                    cmds.append(ds.RecvActivation(buffer))
                if self.is_first_stage or self.is_last_stage:
                    cmds.append(ds.LoadMicroBatch(buffer))
                cmds.append(ds.ForwardPass(buffer))
                if not self.is_last_stage:
                    cmds.append(ds.SendActivation(buffer))
                yield cmds
            for chunk in reversed(chunks):
                buffer = chunk - start
                cmds = []
                if not self.is_last_stage:
                    cmds.append(ds.RecvGrad(buffer))
                cmds.append(ds.BackwardPass(buffer))
                if not self.is_first_stage:
                    cmds.append(ds.SendGrad(buffer))
                if chunk == first_in_last_window:
                    cmds += [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]
                yield cmds
