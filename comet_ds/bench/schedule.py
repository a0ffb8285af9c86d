"""Schedule replay: the instruction streams the engine runs, timed with blocking send/recv.

`replay` takes one schedule object per stage (the ones `CometPipelineEngine` builds), gives every
instruction a cost, and runs the stages against each other: a send and its receive complete together,
when the later of the two is issued (rendezvous, as NCCL and large gloo messages behave), so a
stream whose sends and receives do not line up deadlocks here as it would on the machines. It
reports the step's makespan, each stage's busy time and its peak of live activation buffers.

`DrainingSchedule` is the previous schedule, kept to compare against: every block's forwards, then its
backwards, so the pipeline fills and drains once per BPTT window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deepspeed.runtime.pipe import schedule as ds

from comet_ds.pipeline.schedule import BACKWARD, FORWARD, BlockSchedule, ChunkSchedule, Op, StepPlan


class DrainingSchedule(BlockSchedule):
    """Each block's forwards, then its backwards from last to first; the next block starts after."""

    def order(self, stage_id: int) -> list[Op]:
        return [op for block in self.plan.blocks
                for op in [*((FORWARD, m) for m in block), *((BACKWARD, m) for m in reversed(block))]]


SCHEDULES: dict[str, type[BlockSchedule]] = {"draining (before)": DrainingSchedule, "1F1B over blocks": ChunkSchedule}


@dataclass(frozen=True)
class Costs:
    """Time per instruction on one stage; loading, reductions and the optimizer step cost nothing here."""

    forward: float = 1.0
    backward: float = 2.0
    send: float = 0.0  # per transfer, paid by both sides of it

    def of(self, instruction: ds.PipeInstruction) -> float:
        if isinstance(instruction, ds.ForwardPass):
            return self.forward
        if isinstance(instruction, ds.BackwardPass):
            return self.backward
        return 0.0


class ScheduleDeadlock(RuntimeError):
    """The stages wait on one another: no pending send has its receive issued, or the reverse."""


class ScheduleMismatch(RuntimeError):
    """A send and the receive it meets carry different micro-batches: the data would arrive in the wrong place."""


@dataclass
class ReplayResult:
    makespan: float
    busy: list[float]  # compute time per stage
    peak_buffers: list[int]  # most activation buffers alive at once, per stage
    num_pipe_buffers: list[int]  # what each stage's schedule reserves
    optimizer_steps: list[int] = field(default_factory=list)

    @property
    def stages(self) -> int:
        return len(self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step, averaged over stages (as `CometPipelineEngine.stage_stats` measures it)."""
        return 1.0 - sum(self.busy) / (self.stages * self.makespan)

    @property
    def ideal_makespan(self) -> float:
        """The busiest stage's own work: a pipeline that never waits."""
        return max(self.busy)


# the link an instruction uses: what travels on it, and where its sender stands relative to this stage
_LINKS = {ds.SendActivation: ("activation", 0), ds.RecvActivation: ("activation", -1),
          ds.SendGrad: ("gradient", 0), ds.RecvGrad: ("gradient", 1)}


def replay(schedules: Sequence[ds.PipeSchedule], costs: Costs) -> ReplayResult:
    """Run schedule s as stage s with blocking p2p; raise ScheduleDeadlock naming the stuck stages, and
    ScheduleMismatch where a transfer's two sides mean different micro-batches (forwards run in
    micro-batch order, so a buffer's micro-batch is known from the forward that filled it)."""
    streams = [[cmd for step in schedule.steps() for cmd in step] for schedule in schedules]
    stages = len(streams)
    clock, busy = [0.0] * stages, [0.0] * stages
    position = [0] * stages
    live: list[set[int]] = [set() for _ in range(stages)]
    micro_batch_of: list[dict[int, int]] = [{} for _ in range(stages)]  # buffer -> its latest forward's micro-batch
    forwards = [0] * stages
    peak, optimizer_steps = [0] * stages, [0] * stages
    # link (kind, sender, receiver) -> the stage blocked on it, and the micro-batch it transfers
    waiting: dict[tuple[str, int, int], tuple[int, int | None]] = {}
    runnable = deque(range(stages))
    while runnable:
        stage = runnable.popleft()
        while position[stage] < len(streams[stage]):
            cmd = streams[stage][position[stage]]
            if type(cmd) in _LINKS:
                kind, offset = _LINKS[type(cmd)]
                sender = stage + offset
                link = (kind, sender, sender - 1 if kind == "gradient" else sender + 1)
                if not (0 <= link[1] < stages and 0 <= link[2] < stages):
                    raise ScheduleDeadlock(f"stage {stage} issues {cmd} with no stage on the other side")
                # a received activation is for the next forward; everything else names a filled buffer
                # None: a buffer no forward has filled yet (the transfer can only be wrong, if it ever meets)
                micro_batch = forwards[stage] if isinstance(cmd, ds.RecvActivation) else \
                    micro_batch_of[stage].get(cmd.buffer_id)
                if link not in waiting:
                    waiting[link] = (stage, micro_batch)
                    break  # blocked until the other side issues its half
                other, other_micro_batch = waiting.pop(link)
                if other_micro_batch != micro_batch or micro_batch is None:
                    where = f"on the {kind} link {link[1]}->{link[2]}"
                    raise ScheduleMismatch(f"{where}, stage {other} transfers micro-batch {other_micro_batch} and "
                                           f"stage {stage} micro-batch {micro_batch}")
                done = max(clock[stage], clock[other]) + costs.send
                clock[stage] = clock[other] = done
                position[other] += 1
                runnable.append(other)
            else:
                _account(cmd, stage, live[stage], schedules[stage].num_pipe_buffers())
                if isinstance(cmd, ds.ForwardPass):
                    micro_batch_of[stage][cmd.buffer_id] = forwards[stage]
                    forwards[stage] += 1
                cost = costs.of(cmd)
                clock[stage] += cost
                busy[stage] += cost
                peak[stage] = max(peak[stage], len(live[stage]))
                optimizer_steps[stage] += isinstance(cmd, ds.OptimizerStep)
            position[stage] += 1
    stuck = [s for s in range(stages) if position[s] < len(streams[s])]
    if stuck:
        waits = ", ".join(f"stage {s} at {streams[s][position[s]]} (instruction {position[s]})" for s in stuck)
        raise ScheduleDeadlock(f"the schedule deadlocks: {waits}")
    return ReplayResult(max(clock), busy, peak, [s.num_pipe_buffers() for s in schedules], optimizer_steps)


def _account(cmd: ds.PipeInstruction, stage: int, live: set[int], reserved: int) -> None:
    """Track the buffers holding activations: a forward fills one, its backward frees it."""
    if isinstance(cmd, ds.ForwardPass):
        if cmd.buffer_id in live or cmd.buffer_id >= reserved:
            problem = "still holds activations awaiting backward" if cmd.buffer_id in live else \
                f"is beyond the {reserved} reserved"
            raise ValueError(f"stage {stage}: a forward writes buffer {cmd.buffer_id}, which {problem}")
        live.add(cmd.buffer_id)
    elif isinstance(cmd, ds.BackwardPass):
        live.discard(cmd.buffer_id)


def fill_drain_bound(stages: int, micro_batches: int) -> float:
    """Bubble fraction of a pipeline that fills once and drains once: (S-1)/(M+S-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def compare(stages: int, chunks: int, window: int | None, accumulation: int, costs: Costs) -> list[dict[str, Any]]:
    """Both schedules replayed on one step of `accumulation` groups of `chunks` chunks: one row each."""
    plan = StepPlan.of([chunks] * accumulation, window)
    rows = []
    for name, schedule in SCHEDULES.items():
        result = replay([schedule(plan, stages, s) for s in range(stages)], costs)
        rows.append({"schedule": name, "stages": stages, "chunks": chunks, "window": window,
                     "accumulation": accumulation, "makespan": result.makespan, "ideal": result.ideal_makespan,
                     "bubble_fraction": result.bubble_fraction, "bound": fill_drain_bound(stages, plan.micro_batches),
                     "peak_buffers": result.peak_buffers, "optimizer_steps": result.optimizer_steps})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'schedule':<18} {'makespan':>10} {'ideal':>10} {'bubble':>7} {'bound':>7}  peak buffers per stage"]
    for r in rows:
        lines.append(f"{r['schedule']:<18} {r['makespan']:>10.4g} {r['ideal']:>10.4g} {r['bubble_fraction']:>7.4f} "
                     f"{r['bound']:>7.4f}  {r['peak_buffers']}")
    return "\n".join(lines)


def calibrate(base: str, stages: int, repeats: int = 3) -> Costs:
    """One chunk's forward and backward through the whole bench model on this machine (best of
    `repeats`), split evenly over `stages`: seconds per stage."""
    import random

    import torch

    from comet_ds.bench import BENCH_CONFIG
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.pretrained import build_comet

    torch.manual_seed(0)
    model, tokenizer = build_comet(base, BENCH_CONFIG)
    rng = random.Random(0)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    ids = [rng.choice(vocab) for _ in range(BENCH_CONFIG.chunk_size)]
    chunks = ChunkLayout(BENCH_CONFIG, model.tokens).layout([ids])
    timings = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        loss = model(chunks[:1]).loss_sum
        middle = time.perf_counter()
        loss.backward()
        timings.append((middle - begin, time.perf_counter() - middle))
    forward, backward = (min(t[i] for t in timings[1:]) for i in range(2))  # the first round warms up allocations
    model.zero_grad(set_to_none=True)
    return Costs(forward=forward / stages, backward=backward / stages)
