"""The pipeline schedules replayed with blocking send/recv: timings, buffers, deadlocks (no processes)."""

import json

import pytest
from deepspeed.runtime.pipe import schedule as ds

from comet_ds.bench.schedule import (
    Costs,
    DrainingSchedule,
    ScheduleDeadlock,
    ScheduleMismatch,
    compare,
    fill_drain_bound,
    replay,
)
from comet_ds.cli import main
from comet_ds.pipeline.schedule import BlockSchedule, ChunkSchedule, StepPlan


def streams(schedule: type, plan: StepPlan, stages: int) -> list:
    return [schedule(plan, stages, s) for s in range(stages)]


def test_plan_cuts_each_group_into_windows():
    plan = StepPlan.of([5, 3], window=2)
    assert plan.blocks == [range(0, 2), range(2, 4), range(4, 5), range(5, 7), range(7, 8)]
    assert plan.sequence_starts == {0, 5}
    assert plan.backward_order() == [1, 0, 3, 2, 4, 6, 5, 7]
    assert StepPlan.of([4], None).blocks == [range(0, 4)]


def test_a_hand_computed_two_stage_step():
    # 2 stages, 2 chunks in windows of 1, forward 1, backward 2. Before: F0 B0 drain, F1 B1 drain:
    # stage 0 F0 [0,1], stage 1 F0 [1,2] B0 [2,4], stage 0 B0 [4,6] F1 [6,7], stage 1 F1 [7,8] B1 [8,10],
    # stage 0 B1 [10,12]. Now stage 0 runs F1 at [1,2] while chunk 0 is on stage 1; it sends chunk 1
    # when chunk 0's gradient arrives at 4: stage 0 B0 [4,6] B1 [7,9], stage 1 F1 [4,5] B1 [5,7].
    plan = StepPlan.of([2], window=1)
    before = replay(streams(DrainingSchedule, plan, 2), Costs(forward=1, backward=2))
    now = replay(streams(ChunkSchedule, plan, 2), Costs(forward=1, backward=2))
    assert (before.makespan, before.busy, before.peak_buffers) == (12, [6, 6], [1, 1])
    assert (now.makespan, now.busy, now.peak_buffers) == (9, [6, 6], [2, 1])
    assert now.bubble_fraction == pytest.approx(1 / 3)
    assert now.num_pipe_buffers == now.peak_buffers
    assert now.optimizer_steps == before.optimizer_steps == [1, 1]


def test_transfers_cost_both_sides():
    plan = StepPlan.of([1], None)
    # F [0,1], send 0.5 -> stage 1 F [1.5,2.5] B [2.5,4.5], grad 0.5 -> stage 0 B [5,7]
    assert replay(streams(ChunkSchedule, plan, 2), Costs(1, 2, send=0.5)).makespan == 7


@pytest.mark.parametrize(("stages", "chunks", "window", "groups"),
                         [(4, 64, 8, 1), (3, 10, 3, 2), (8, 20, None, 2), (2, 7, 4, 3), (5, 3, 2, 1)])
def test_one_fill_and_one_drain_per_step_with_bounded_buffers(stages, chunks, window, groups):
    plan = StepPlan.of([chunks] * groups, window)
    schedules = streams(ChunkSchedule, plan, stages)
    result = replay(schedules, Costs(forward=1, backward=2))
    assert result.bubble_fraction <= fill_drain_bound(stages, plan.micro_batches) + 1e-12
    longest = max(len(block) for block in plan.blocks)
    assert result.peak_buffers == [min(plan.micro_batches, longest + stages - 1 - s) for s in range(stages)]
    assert result.num_pipe_buffers == result.peak_buffers
    assert result.optimizer_steps == [1] * stages
    for schedule in schedules:  # every micro-batch once forward and once backward, the step at the end
        cmds = [cmd for step in schedule.steps() for cmd in step]
        assert sum(isinstance(c, ds.ForwardPass) for c in cmds) == plan.micro_batches
        assert sum(isinstance(c, ds.BackwardPass) for c in cmds) == plan.micro_batches
        assert isinstance(cmds[-1], ds.OptimizerStep)


def test_every_small_shape_runs_without_deadlock_within_the_bound():
    for stages in range(1, 6):
        for chunks in range(1, 10):
            for window in (1, 2, 3, None):
                for groups in (1, 2):
                    plan = StepPlan.of([chunks] * groups, window)
                    result = replay(streams(ChunkSchedule, plan, stages), Costs(forward=1, backward=2))
                    shape = (stages, chunks, window, groups)
                    assert result.bubble_fraction <= fill_drain_bound(stages, plan.micro_batches) + 1e-12, shape
                    assert result.num_pipe_buffers == result.peak_buffers, shape


class FirstStageWaitsForAGradient(ChunkSchedule):
    """Stage 0 receives its first gradient before it sends anything: stage 1 waits for that activation."""

    def steps(self):
        cmds = [cmd for step in super().steps() for cmd in step]
        if self.is_first_stage:
            first = next(i for i, c in enumerate(cmds) if isinstance(c, ds.RecvGrad))
            cmds.insert(0, cmds.pop(first))
        yield from ([c] for c in cmds)


def test_a_misordered_schedule_deadlocks_and_names_the_stuck_stages():
    plan = StepPlan.of([4], window=2)
    with pytest.raises(ScheduleDeadlock, match=r"stage 0 at RecvGrad.*stage 1 at RecvActivation"):
        replay(streams(FirstStageWaitsForAGradient, plan, 2), Costs())


class SecondActivationFirst(ChunkSchedule):
    """Stage 0 sends its first two activations in the wrong order: every transfer meets a receive, but
    stage 1 would take chunk 1's activation as chunk 0's."""

    def steps(self):
        cmds = [cmd for step in super().steps() for cmd in step]
        if self.is_first_stage:
            first, second, *_ = (i for i, c in enumerate(cmds) if isinstance(c, ds.SendActivation))
            cmds.insert(second, cmds.pop(first))  # after the second forward, its send, then the first's
        yield from ([c] for c in cmds)


def test_a_send_that_meets_the_wrong_receive_is_reported():
    plan = StepPlan.of([4], window=2)
    with pytest.raises(ScheduleMismatch, match="on the activation link 0->1, stage 0 transfers micro-batch 1 and "
                                               "stage 1 micro-batch 0"):
        replay(streams(SecondActivationFirst, plan, 2), Costs())


class DrainingUpstreamOfOneF1B(BlockSchedule):
    """Stage 0 drains every window while stage 1 runs ahead: their link orders differ."""

    def order(self, stage_id):
        return (DrainingSchedule if stage_id == 0 else ChunkSchedule).order(self, stage_id)


def test_stage_orders_that_cannot_share_a_link_are_refused():
    with pytest.raises(ValueError, match="stage 0 cannot match stage 1: it takes the gradient of micro-batch 0 "
                                         "before its activation 2 is computed here"):
        DrainingUpstreamOfOneF1B(StepPlan.of([4], window=2), 2, 0)


def test_the_old_schedule_drains_every_window():
    before, now = compare(stages=8, chunks=64, window=8, accumulation=1, costs=Costs())
    assert before["bubble_fraction"] == pytest.approx(7 / 15)  # (S-1)/(W+S-1) with backward = 2 forwards
    assert now["bubble_fraction"] == pytest.approx(7 / 71)
    assert now["bound"] == pytest.approx(7 / 71)


def test_bench_schedule_prints_both_schedules(capsys):
    main(["bench", "schedule", "--stages", "2", "--chunks", "6", "--window", "3", "--accumulation", "2"])
    out = capsys.readouterr().out
    assert "2 stages, 2 x 6 chunks, window 3:" in out
    assert "draining (before)" in out and "1F1B over blocks" in out


def test_calibrate_measures_the_bench_model_here(base_dirs, capsys, tmp_path):
    out_json = tmp_path / "rows.json"
    main(["bench", "schedule", "--stages", "2", "--chunks", "4", "--window", "2", "--calibrate",
          "--base", base_dirs["llama"], "--json", str(out_json)])
    out = capsys.readouterr().out
    assert f"calibrated on {base_dirs['llama']}: per stage of 2, forward" in out
    rows = json.loads(out_json.read_text())
    assert [row["schedule"] for row in rows] == ["draining (before)", "1F1B over blocks"]
    assert rows[1]["makespan"] < rows[0]["makespan"]  # same measured costs, one drain instead of two


def test_a_layer_takes_the_next_windows_forwards_between_this_windows_backwards(base_dirs):
    import torch

    from comet_ds.config import CometConfig
    from comet_ds.layout import ChunkLayout
    from comet_ds.modeling.pretrained import build_comet
    from comet_ds.pipeline.stages import ChunkContexts, CometLayerPipe

    config = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=6)
    torch.manual_seed(0)
    model, _ = build_comet(base_dirs["llama"], config)
    chunks = ChunkLayout(config, model.tokens).layout([list(range(4, 68))])[:4]
    layer = CometLayerPipe(model.layers[0], ChunkContexts(model.rotary_emb, torch.float32, config.queue_capacity))
    layer.start_step(StepPlan.of([4], window=2))
    out = [layer((model.embedding(c.input_ids), c.roles, c.labels))[0] for c in chunks[:3]]
    out[1].sum().backward()  # window 0's backwards, with window 1's first forward already run
    out[0].sum().backward()
    out.append(layer((model.embedding(chunks[3].input_ids), chunks[3].roles, chunks[3].labels))[0])
    with pytest.raises(RuntimeError, match="backward of chunk 2 arrived while chunk 3 was next in its window"):
        out[2].sum().backward()
