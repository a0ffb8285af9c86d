"""The 2-process DeepSpeed pipeline computes the single-process loss and gradients (fp32, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comet_ds.resources import free_port

WORKER = Path(__file__).with_name("pipeline_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_pipeline(base: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), "--base", base, "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def assert_exact(result: dict, stages: int = 2, extra_tied_copies: int = 0) -> None:
    assert abs(result["loss_pipeline"] - result["loss_reference"]) <= 1e-5 * abs(result["loss_reference"])
    assert result["max_rel_grad_err"] <= 1e-5, result
    # every trainable tensor was compared on the stage that owns it (ranks 0..stages-1: replica 0)
    assert sum(result["compared_per_rank"][:stages]) == result["trainable_tensors"] + extra_tied_copies
    assert all(n > 0 for n in result["memory_grads_per_rank"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_stages_match_full_backprop_through_memory(base_dirs, tmp_path, arch):
    result = run_pipeline(base_dirs[arch], tmp_path)
    assert result["chunks"] == [[5]]  # T >= 4 chunks, FIFO evicting
    assert_exact(result)


def test_bptt_window_matches_a_reference_cut_at_the_same_chunks(base_dirs, tmp_path):
    assert_exact(run_pipeline(base_dirs["llama"], tmp_path, "--bptt-window", "2"))


def test_a_window_that_does_not_divide_the_chunks_with_two_accumulation_groups(base_dirs, tmp_path):
    # windows [0-2][3-4] in each group; the second group's forwards overlap the first group's backwards
    result = run_pipeline(base_dirs["llama"], tmp_path, "--bptt-window", "3", "--accumulation", "2")
    assert result["chunks"] == [[5, 5]]
    assert_exact(result)


def test_zero_stage_1_matches_too(base_dirs, tmp_path):
    assert_exact(run_pipeline(base_dirs["llama"], tmp_path, "--zero", "1"))


def test_zero_stage_1_with_two_replicas(base_dirs, tmp_path):
    assert_exact(run_pipeline(base_dirs["qwen3"], tmp_path, "--stages", "1", "--zero", "1"), stages=1)


def test_the_comparison_catches_a_gradient_cut_in_the_wrong_place(base_dirs, tmp_path):
    result = run_pipeline(base_dirs["llama"], tmp_path, "--bptt-window", "2", "--reference-window", "0")
    assert result["max_rel_grad_err"] > 1e-2


def test_two_data_parallel_replicas(base_dirs, tmp_path):
    result = run_pipeline(base_dirs["qwen3"], tmp_path, "--stages", "1")
    assert result["chunks"] == [[5], [5]]
    assert_exact(result, stages=1)


def test_two_data_parallel_replicas_with_two_accumulation_groups(base_dirs, tmp_path):
    result = run_pipeline(base_dirs["llama"], tmp_path, "--stages", "1", "--accumulation", "2", "--bptt-window", "2")
    assert result["chunks"] == [[5, 5], [5, 5]]
    assert_exact(result, stages=1)


def test_full_finetune_with_tied_embeddings_across_stages(base_dirs, tmp_path):
    # the tied matrix lives on both stages; DeepSpeed sums its two gradients
    assert_exact(run_pipeline(base_dirs["qwen3"], tmp_path, "--method", "full"), extra_tied_copies=1)


def test_mixed_chunk_plans_match_too(base_dirs, tmp_path):
    # two groups: plans of every strategy, sequences of one group ending at different chunks, a window of 3
    result = run_pipeline(base_dirs["llama"], tmp_path, "--chunk-plan", "mixed", "--accumulation", "2",
                          "--bptt-window", "3")
    assert result["chunks"] != [[5, 5]]  # not the fixed plan's chunks
    assert_exact(result)


def test_the_full_vocabulary_loss_matches_too(base_dirs, tmp_path):
    assert_exact(run_pipeline(base_dirs["qwen3"], tmp_path, "--loss-vocabulary", "full", "--method", "full"),
                 extra_tied_copies=1)
