"""The training schedule: micro-batch m is one chunk of one sequence group; one optimizer step per schedule.

A step's micro-batches form blocks (`StepPlan`): a BPTT window of one sequence group. Memories are
detached at block boundaries and a new group starts without memory, so a block's backward needs
nothing from any other block, and a block's forwards need only the forwards before them. Inside a
block the backwards run from its last chunk to its first (the memory gradient of chunk t+1 flows into
chunk t).

`ChunkSchedule` runs 1F1B over blocks: stage s runs forwards until the last stage can start the
current block's backward (the block's last chunk, plus S-1-s chunks in flight towards it), then
alternates one backward with one forward. So the forwards of block b+1 fill the time in which block
b's gradients come back; the pipeline fills once and drains once per optimizer step. Stage s holds
at most W + S - 1 - s chunks' activations (W: the longest block; never more than the step's
micro-batches), and `num_pipe_buffers` is exactly the most this stage's stream keeps alive.

Blocking p2p needs every send matched by a receive issued in the same order on both sides of a
link. A stage receives activations right before each forward and sends gradients right after each
backward; the stage upstream of it issues its activation sends and gradient receives in that same
order, sending an activation later than its forward where the downstream stage takes a gradient
first (as DeepSpeed's own 1F1B defers its sends by one step).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from deepspeed.runtime.pipe import schedule as ds

FORWARD, BACKWARD = "F", "B"
Op = tuple[str, int]  # (FORWARD or BACKWARD, micro-batch)


@dataclass(frozen=True)
class StepPlan:
    """The blocks of one optimizer step: `block_starts[i]` is the first micro-batch of block i; a
    micro-batch in `sequence_starts` begins a new sequence group (no memory yet)."""

    micro_batches: int
    block_starts: tuple[int, ...] = (0,)
    sequence_starts: frozenset[int] = frozenset({0})

    @classmethod
    def of(cls, group_chunks: Sequence[int], window: int | None) -> StepPlan:
        """Groups of `group_chunks[g]` chunks each, cut into BPTT windows of `window` chunks (None: no cut)."""
        if not group_chunks or min(group_chunks) < 1:
            raise ValueError(f"every sequence group needs at least one chunk (got {list(group_chunks)})")
        if window is not None and window < 1:
            raise ValueError(f"the BPTT window must be >= 1 chunk or None (got {window})")
        starts, group_starts, first = [], [], 0
        for chunks in group_chunks:
            group_starts.append(first)
            starts.extend(range(first, first + chunks, window or chunks))
            first += chunks
        return cls(first, tuple(starts), frozenset(group_starts))

    @cached_property
    def blocks(self) -> list[range]:
        stops = (*self.block_starts[1:], self.micro_batches)
        return [range(a, b) for a, b in zip(self.block_starts, stops)]

    def block_of(self, micro_batch: int) -> int:
        return bisect.bisect_right(self.block_starts, micro_batch) - 1

    def starts_block(self, micro_batch: int) -> bool:
        return self.block_starts[self.block_of(micro_batch)] == micro_batch

    def backward_order(self) -> list[int]:
        """Micro-batches in backward order: block by block, each from its last chunk to its first."""
        return [m for block in self.blocks for m in reversed(block)]


class BlockSchedule(ds.PipeSchedule):
    """A DeepSpeed instruction stream from an order of forwards and backwards per stage (`order`).

    Forwards run in micro-batch order and backwards in `plan.backward_order()` on every stage, so
    activations and gradients cross each link in the same order on both sides; the stream places the
    sends and receives (see the module docstring), allocates activation buffers, and ends with the
    gradient reduction and the optimizer step.
    """

    def __init__(self, plan: StepPlan, stages: int, stage_id: int):
        super().__init__(plan.micro_batches, stages, stage_id)
        self.plan = plan
        self._steps, self._buffers = self._build()

    def order(self, stage_id: int) -> list[Op]:
        raise NotImplementedError

    def num_pipe_buffers(self) -> int:
        return self._buffers

    def steps(self) -> Iterator[list[ds.PipeInstruction]]:
        yield from self._steps

    def _build(self) -> tuple[list[list[ds.PipeInstruction]], int]:
        ops = self.order(self.stage_id)
        # the downstream link's order: what the next stage receives and sends, in its own order
        link = [] if self.is_last_stage else self.order(self.stage_id + 1)
        sent = 0  # entries of `link` done
        free: list[int] = []
        buffers, buffer_of, forwarded = 0, {}, set()
        steps: list[list[ds.PipeInstruction]] = []

        def send_ready_activations(cmds: list[ds.PipeInstruction]) -> None:
            nonlocal sent
            while sent < len(link) and link[sent][0] == FORWARD and link[sent][1] in forwarded:
                cmds.append(ds.SendActivation(buffer_of[link[sent][1]]))
                sent += 1

        for kind, micro_batch in ops:
            cmds: list[ds.PipeInstruction] = []
            if kind == FORWARD:
                if free:
                    buffer = heapq.heappop(free)
                else:
                    buffer, buffers = buffers, buffers + 1
                buffer_of[micro_batch] = buffer
                if not self.is_first_stage:
                    cmds.append(ds.RecvActivation(buffer))
                if self.is_first_stage or self.is_last_stage:
                    cmds.append(ds.LoadMicroBatch(buffer))
                cmds.append(ds.ForwardPass(buffer))
                forwarded.add(micro_batch)
            else:
                buffer = buffer_of.pop(micro_batch)
                if not self.is_last_stage:
                    send_ready_activations(cmds)
                    if link[sent] != (BACKWARD, micro_batch):
                        raise ValueError(f"stage {self.stage_id} cannot match stage {self.stage_id + 1}: it takes the "
                                         f"gradient of micro-batch {micro_batch} before its activation "
                                         f"{link[sent][1]} is computed here")
                    cmds.append(ds.RecvGrad(buffer))
                    sent += 1
                    # the next stage waits for these before its next forward: send them before this backward
                    send_ready_activations(cmds)
                cmds.append(ds.BackwardPass(buffer))
                if not self.is_first_stage:
                    cmds.append(ds.SendGrad(buffer))
                heapq.heappush(free, buffer)
            send_ready_activations(cmds)
            steps.append(cmds)
        steps[-1] += [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]
        return steps, buffers


class ChunkSchedule(BlockSchedule):
    """1F1B over blocks: the next block's forwards overlap this block's backwards (module docstring)."""

    def order(self, stage_id: int) -> list[Op]:
        plan, ops, forwards = self.plan, [], 0
        in_flight = self.stages - 1 - stage_id  # chunks between this stage and the last one
        for micro_batch in plan.backward_order():
            block = plan.blocks[plan.block_of(micro_batch)]
            # the last stage needs the whole block before its first backward; after that, one forward
            # per backward keeps every stage busy
            wanted = min(plan.micro_batches, max(block.stop + in_flight, forwards + 1))
            ops += [(FORWARD, m) for m in range(forwards, wanted)]
            forwards = max(forwards, wanted)
            ops.append((BACKWARD, micro_batch))
        return ops
