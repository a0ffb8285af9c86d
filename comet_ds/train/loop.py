"""`comet-ds train`: the training entry point, top to bottom.

preflight (no processes yet; a checkpoint to resume from is verified here) → process group → model + LoRA →
pipeline stages → DeepSpeed engine → resume → for each step: the replica's sequences → chunks → one pipeline
step → metrics, checkpoints. Non-finite losses stop the run before anything non-finite is saved.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib.resources import as_file
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from comet_ds.config import CometConfigError
from comet_ds.layout import ChunkLayout, fixed_chunk_sizes
from comet_ds.layout.chunks import restart_plan
from comet_ds.layout.plan import boundary_ids, plan_batch
from comet_ds.train.config import RunConfig
from comet_ds.train.data import StepBatch, check_has_targets, load_training_dataset
from comet_ds.train.tracking import Tracker, redact
from data_prep.fs import check_output, output_directory

if TYPE_CHECKING:
    from comet_ds.modeling.model import CometForCausalLM
    from comet_ds.pipeline.engine import CometPipelineEngine


@dataclass(frozen=True)
class Preflight:
    stages: int
    num_layers: int
    partition: list[list[str]]
    trainable_params: int
    total_params: int
    memory_estimate_mib: dict[str, float | int | str]
    resume_tag: str | None = None  # the verified checkpoint to resume from
    skipped_checkpoints: tuple[str, ...] = ()  # newer checkpoints `--resume auto` passed over, and why


def preflight(run: RunConfig, resume: str | None = None) -> Preflight:
    """Every check that needs no process group: the checkpoint to resume from (resume: "latest" or "auto"),
    dataset (its tokenizer and every id), base model, stages, chunk length."""
    stages = run.pipeline_stages()
    resume_tag, skipped = _resume_point(run, resume)
    hf_config, skeleton = _check_model_and_data(run)
    num_layers = hf_config.num_hidden_layers
    if stages > num_layers:
        raise CometConfigError(f"{stages} pipeline stages for {num_layers} decoder layers: use at most {num_layers}")
    total = sum(p.numel() for p in skeleton.parameters())
    h, c = hf_config.hidden_size, run.comet
    # per layer: global net (norm, 2H gate, rank-r adapter) + temporary net (norm, rank-r adapter)
    memory_params = num_layers * (3 * h + 2 * h * c.bottleneck_rank + (h + 2 * h * c.bottleneck_rank
                                                                        if c.temp_enabled else 0))
    if run.finetune.method == "lora":
        r = run.finetune.lora_rank
        per_layer = sum(r * (m.in_features + m.out_features) for name, m in skeleton.model.layers[0].named_modules()
                        if name.rsplit(".", 1)[-1] in run.finetune.lora_targets and hasattr(m, "in_features"))
        trainable = num_layers * per_layer + memory_params
    else:
        per_layer = sum(p.numel() for p in skeleton.model.layers[0].parameters())
        trainable = total + memory_params
    from comet_ds.pipeline.engine import stage_partition  # importing it checks the installed DeepSpeed

    partition = stage_partition(run.pipeline.partition, stages, num_layers,
                                per_layer + memory_params // num_layers, (c.global_slots + 2) * h)
    estimate = _memory_estimate(run, skeleton, partition, trainable, stages)
    return Preflight(stages, num_layers, partition, trainable, total, estimate, resume_tag, tuple(skipped))


def _resume_point(run: RunConfig, resume: str | None) -> tuple[str | None, list[str]]:
    """The verified checkpoint to resume from (None: a fresh start) and the newer ones passed over; a fresh
    run refuses an output_dir with checkpoints, and any run one whose adapter it did not write."""
    from comet_ds.train.checkpoint import choose_resume_checkpoint

    checkpoints = Path(run.output_dir) / "checkpoints"
    if not resume and (checkpoints / "latest").exists():
        raise CometConfigError(f"{run.output_dir} holds checkpoints of an earlier run: pass --resume to continue "
                               "it, or choose another output_dir")
    resume_tag, skipped = (None, []) if resume is None else choose_resume_checkpoint(checkpoints, resume)
    # the run ends by replacing output_dir/adapter: refuse now, not after training, if that is not its own
    check_output(Path(run.output_dir) / "adapter", "comet-ds train", overwrite=True)
    return resume_tag, skipped


def _check_model_and_data(run: RunConfig) -> tuple[Any, torch.nn.Module]:
    """The base model's config and a weightless skeleton of it, once the dataset, the base model, init_from
    and the tokenizer the run will use are checked against one another."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from comet_ds.modeling.backbone import check_fits, decoder_parts
    from comet_ds.modeling.pretrained import check_continuable
    from comet_ds.modeling.tokens import extend_tokenizer, inserted_tokens
    from comet_ds.train.data import check_dataset_tokenizer, check_token_ids

    dataset = load_training_dataset(run.dataset)
    check_has_targets(dataset, run.dataset, run.train.max_tokens)
    if not (Path(run.base_model) / "config.json").is_file():
        raise FileNotFoundError(f"base model {run.base_model!r} has no config.json (comet-ds init-base builds one)")
    hf_config = AutoConfig.from_pretrained(run.base_model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    decoder_parts(skeleton)
    check_fits(skeleton, run.comet)
    if run.init_from:
        check_continuable(run.init_from, run.comet, run.finetune, hf_config, run.base_model)
    check_dataset_tokenizer(run.dataset, [run.base_model, *([run.init_from] if run.init_from else [])],
                            run.allow_tokenizer_mismatch)
    tokenizer = AutoTokenizer.from_pretrained(run.init_from or run.base_model)  # the tokenizer train() uses
    extend_tokenizer(tokenizer, run.comet)
    check_token_ids(dataset, len(tokenizer), inserted_tokens(tokenizer), run.dataset)
    return hf_config, skeleton


def _memory_estimate(run: RunConfig, skeleton: torch.nn.Module, partition: list[list[str]], trainable: int,
                     stages: int) -> dict[str, float | int | str]:
    """Rough fp32 memory of the busiest stage: weights, optimizer state, and the activations of one chunk."""
    num_layers = len(skeleton.model.layers)
    total = sum(p.numel() for p in skeleton.parameters())
    layer_params = sum(p.numel() for p in skeleton.model.layers[0].parameters())
    bytes_per = 4
    per_chunk_activations = (run.train.sequences_per_step * run.comet.chunk_length * skeleton.config.hidden_size
                             * bytes_per * 12)  # ~12 saved tensors
    layers_per_stage = max(sum(name.startswith("layer ") for name in names) for names in partition)
    estimate = {
        "weights_per_stage_mib":
            (layer_params * layers_per_stage + total - num_layers * layer_params) * bytes_per / 2**20,
        "optimizer_per_stage_mib": 3 * trainable / stages * bytes_per / 2**20,
        "activations_per_chunk_per_stage_mib": per_chunk_activations * layers_per_stage / 2**20,
    }
    estimate = {k: round(v, 1) for k, v in estimate.items()}
    # stage 0 keeps a window plus the chunks in flight to the last stage (comet_ds/pipeline/schedule.py)
    estimate["activations_kept_chunks"] = run.pipeline.bptt_window + stages - 1 if run.pipeline.bptt_window else "all"
    return estimate


def describe(run: RunConfig, check: Preflight) -> str:
    lines = ["resolved run config:", redact(json.dumps(run.to_dict(), indent=2)), "deepspeed config:",
             json.dumps(run.deepspeed_dict(), indent=2), f"pipeline: {check.stages} stage(s)"]
    lines += [f"  stage {s}: {', '.join(parts)}" for s, parts in enumerate(check.partition)]
    lines.append(f"parameters: {check.trainable_params:,} trainable of ~{check.total_params:,} (base)")
    lines.append("memory estimate (fp32): " + ", ".join(f"{k} {v}" for k, v in check.memory_estimate_mib.items()))
    if not run.pipeline.bptt_window:
        lines.append("  activations are kept for every chunk of a sequence (set pipeline.bptt_window to bound them)")
    if run.train.save_every > run.train.steps:
        lines.append(f"  train.save_every ({run.train.save_every}) exceeds train.steps ({run.train.steps}): the only "
                     "checkpoint is the last step's, so a run stopped before it starts over")
    lines += check.skipped_checkpoints
    if check.resume_tag:
        lines.append(f"resume from checkpoint {check.resume_tag}")
    return "\n".join(lines)


def train(run: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Train `run` from its start or from the checkpoint `resume` picks, and publish output_dir/adapter."""
    check = preflight(run, resume)
    require_launcher()  # what only a real run needs, checked before the process group forms
    run.check_precision()
    state = _set_up(run, check, resume)
    _train_steps(state)
    return _finish(state)


@dataclass
class RunState:
    """What setup hands to the steps and the finish: the run's process, model and engine, the step it starts
    from, and what its steps have seen so far."""

    run: RunConfig
    rank: int
    replicas: int
    model: CometForCausalLM  # whole on every process; the engine trains this stage's layers of it
    tokenizer: Any
    engine: CometPipelineEngine
    scheduler: Any
    tracker: Tracker
    layout_signature: dict[str, Any]  # what a resume must match: stages, replicas, CoMeT and fine-tune settings
    start: int
    losses: list[float] = field(default_factory=list)
    nonfinite: int = 0  # consecutive steps with a non-finite loss or gradient norm

    @property
    def checkpoints(self) -> Path:
        return Path(self.run.output_dir) / "checkpoints"


def _set_up(run: RunConfig, check: Preflight, resume: str | None) -> RunState:
    """Process group, model and engine; then the checkpoint to resume from, and tracking."""
    rank, replicas = _join_process_group(check.stages)
    model, tokenizer, engine, scheduler = _build_engine(run, check.stages, replicas)
    signature = {"stages": check.stages, "replicas": replicas, "comet": run.comet.to_dict(),
                 "finetune": run.finetune.to_dict()}
    saved = _restore(run, check, engine, rank, resume, signature)
    start = 0 if saved is None else saved["step"]
    tracker = _start_tracking(run, rank, saved, start)
    return RunState(run, rank, replicas, model, tokenizer, engine, scheduler, tracker, signature, start)


def _join_process_group(stages: int) -> tuple[int, int]:
    """This process's rank, and the data-parallel replicas of the pipeline the world splits into."""
    import deepspeed
    import deepspeed.comm as dist

    from comet_ds.pipeline.engine import skip_shm_build

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        skip_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % stages:
        raise CometConfigError(f"{world} processes cannot be split into {stages} pipeline stages")
    return rank, world // stages


def _build_engine(run: RunConfig, stages: int,
                  replicas: int) -> tuple[CometForCausalLM, Any, CometPipelineEngine, Any]:
    """The CoMeT model (fresh, or from init_from) as pipeline stages in a DeepSpeed engine: model, tokenizer,
    engine, LR scheduler."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from comet_ds.modeling.pretrained import build_comet, load_comet
    from comet_ds.pipeline.engine import CometPipelineEngine
    from comet_ds.pipeline.stages import build_pipeline_module
    from comet_ds.train.optim import build_optimizer

    torch.manual_seed(run.train.seed)
    if run.init_from:
        model, tokenizer, _ = load_comet(run.init_from, run.base_model, comet=run.comet)
    else:
        model, tokenizer = build_comet(run.base_model, run.comet, run.finetune)
    for layer in model.layers:
        layer.activation_checkpointing = run.train.activation_checkpointing
    topology = PipeDataParallelTopology(num_pp=stages, num_dp=replicas)
    module = build_pipeline_module(model, stages, partition=run.pipeline.partition, topology=topology)
    optimizer, scheduler = build_optimizer(
        module, {id(p) for p in model.memory_parameters()}, run.train.lr, run.train.weight_decay,
        run.comet.memory_lr_multiplier, run.train.warmup_steps, run.train.steps, run.train.lr_schedule)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=run.deepspeed_dict())
    return model, tokenizer, CometPipelineEngine.adopt(engine, run.pipeline.bptt_window), scheduler


def _restore(run: RunConfig, check: Preflight, engine: CometPipelineEngine, rank: int, resume: str | None,
             signature: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer state of the checkpoint preflight chose, restored into the engine (None: a fresh start);
    every process must have chosen the same one, and it must have been written with this run's layout."""
    from comet_ds.train.checkpoint import restore_checkpoint, same_on_every_rank

    checkpoints = Path(run.output_dir) / "checkpoints"
    if not same_on_every_rank(check.resume_tag, engine.device):
        raise CometConfigError(f"the processes chose different checkpoints to resume from (this one: "
                               f"{check.resume_tag}): every node must see the same {checkpoints}")
    if rank == 0:
        for line in check.skipped_checkpoints:
            print(line, flush=True)
    saved = restore_checkpoint(engine, checkpoints, check.resume_tag) if check.resume_tag else None
    if resume and saved is None and rank == 0:
        print(f"no checkpoint in {checkpoints}: starting from step 0", flush=True)
    if saved is not None:
        found = {k: saved.get(k) for k in signature}
        if found != json.loads(json.dumps(signature)):  # as JSON has it: tuples are lists
            raise CometConfigError(f"checkpoint {checkpoints} was written by a run with {found}; this run has "
                                   f"{signature}: resume with the same layout and CoMeT settings")
    return saved


def _start_tracking(run: RunConfig, rank: int, saved: dict[str, Any] | None, start: int) -> Tracker:
    """The run's tracker (MLflow and metrics.jsonl; rank 0 records): a resume continues the checkpoint's
    MLflow run from its step, a fresh run keeps an earlier metrics file aside and logs the settings."""
    output = Path(run.output_dir)
    metrics_file = output / "metrics.jsonl"
    if rank == 0 and saved is None and metrics_file.exists():
        metrics_file.rename(output / f"metrics.{int(time.time())}.jsonl")
    tracker = Tracker(output, run.tracking.experiment, run.tracking.tracking_uri, run.tracking.run_name,
                      enabled=rank == 0, resume_run_id=None if saved is None else saved.get("mlflow_run_id"),
                      resume_step=None if saved is None else start)
    if saved is None:
        tracker.log_params({"run": run.to_dict(), "deepspeed": run.deepspeed_dict()})
    return tracker


@dataclass(frozen=True)
class StepResult:
    loss: float
    lr: float  # the rate this step's update used
    grad_norm: float  # nan where DeepSpeed computes none
    seconds: float
    tokens_per_s: float
    chunks: int


def _train_steps(state: RunState) -> None:
    """Steps state.start .. train.steps: each replica's sequences → chunks → one pipeline step → metrics and,
    while the losses are finite, checkpoints."""
    from tqdm import tqdm

    from comet_ds.train.data import StepSampler

    run = state.run
    per_group = run.train.sequences_per_step
    sampler = StepSampler(load_training_dataset(run.dataset), state.replicas, per_group * run.train.accumulation_steps,
                          run.train.seed, run.train.max_tokens, run.train.group_by_length, run.train.packing)
    layout = ChunkLayout(run.comet, state.model.tokens)
    replica = state.engine.grid.get_data_parallel_id()
    progress = tqdm(total=run.train.steps, initial=state.start, disable=state.rank != 0, unit="step",
                    dynamic_ncols=True)
    boundaries = boundary_ids(state.tokenizer)
    for step in range(state.start, run.train.steps):
        batch = sampler.batch(step, replica)
        plans, restarts = chunk_plans(batch, run, boundaries, f"{run.train.seed}:{step}:{replica}")
        groups = [layout.layout(batch.input_ids[i:i + per_group], batch.labels[i:i + per_group],
                                None if plans is None else plans[i:i + per_group],
                                None if restarts is None else restarts[i:i + per_group])
                  for i in range(0, len(batch.input_ids), per_group)]
        result = _step(state, groups, batch)
        progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens_per_s:,.0f}")
        progress.update(1)
        _record(state, step + 1, result)
    progress.close()


def chunk_plans(batch: StepBatch, run: RunConfig, boundaries: frozenset[int],
                key: str) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    """The text chunk sizes of the batch's sequences (None: full chunks and a remainder) and, when memories start
    over at each packed document, the chunks where they do (restarts, see ChunkLayout.iter_chunks)."""
    chunk_size, train = run.comet.chunk_size, run.train
    if not train.reset_memory_per_document:
        if train.chunk_plan == "fixed":
            return None, None
        return plan_batch(batch.input_ids, chunk_size, train.max_tokens, boundaries, key), None
    plans, restarts = [], []
    for i, (ids, lengths) in enumerate(zip(batch.input_ids, batch.documents)):
        starts = [0, *itertools.accumulate(lengths)]
        documents = [ids[start:end] for start, end in itertools.pairwise(starts)]
        if train.chunk_plan == "fixed":
            document_plans = [fixed_chunk_sizes(len(document), chunk_size) for document in documents]
        else:
            document_plans = plan_batch(documents, chunk_size, train.max_tokens, boundaries, f"{key}:{i}")
        sizes, where = restart_plan(document_plans)
        plans.append(sizes)
        restarts.append(where)
    return plans, restarts


def _step(state: RunState, groups: list[list[Any]], batch: Any) -> StepResult:
    """One optimizer step over the chunks of a batch's sequence groups; counts it as non-finite when its loss or
    gradient norm is not finite on any process."""
    from comet_ds.train.checkpoint import finite_on_every_rank

    engine = state.engine
    engine.reset_stage_timers()
    lr = state.scheduler.get_last_lr()[0]
    begin = time.perf_counter()
    loss = float(engine.train_step(groups, loss_scale=state.replicas / max(1, batch.global_trained_tokens)))
    seconds = time.perf_counter() - begin
    state.losses.append(loss)
    norm = engine.get_global_grad_norm()  # None where DeepSpeed computes none
    grad_norm = float("nan") if norm is None else float(norm)
    checked = [loss] if norm is None else [loss, grad_norm]
    state.nonfinite = 0 if finite_on_every_rank([torch.tensor(checked)], engine.device) else state.nonfinite + 1
    return StepResult(loss, lr, grad_norm, seconds, batch.global_text_tokens / seconds, sum(map(len, groups)))


def _record(state: RunState, done: int, result: StepResult) -> None:
    """After step `done`: its metrics, then a stop if the losses stayed non-finite too long, else a checkpoint
    when one is due and this step was finite (nothing non-finite is ever saved)."""
    from comet_ds.train.checkpoint import NonFiniteError, save_checkpoint

    run, tracker = state.run, state.tracker
    if done % run.train.log_every == 0 or done == run.train.steps:
        stats = state.engine.stage_stats(result.seconds)
        loss_mean = mean_since_last_log(state.losses, done, state.start, run.train.log_every)
        tracker.log_metrics({"loss": result.loss, "loss_mean": loss_mean, "lr": result.lr,
                             "grad_norm": result.grad_norm, "tokens_per_s": result.tokens_per_s,
                             "step_seconds": result.seconds, "chunks": result.chunks,
                             "bubble_fraction": stats["bubble_fraction"],
                             **{f"peak_mem_mib_stage{s}": m for s, m in enumerate(stats["peak_mem_mib"])},
                             **{f"transfer_fraction_stage{s}": f for s, f in enumerate(stats["transfer_fraction"])}},
                            step=done)
    if state.nonfinite >= run.train.max_nonfinite_steps:
        tracker.close(status="FAILED")
        raise NonFiniteError(f"the loss or gradient norm was not finite for {state.nonfinite} consecutive steps "
                             f"(steps {done - state.nonfinite + 1}-{done}, loss {result.loss}); stopped without "
                             "saving: lower train.lr, or check the dataset and init_from weights")
    if state.nonfinite == 0 and (done % run.train.save_every == 0 or done == run.train.steps):
        save_checkpoint(state.engine, state.model, state.tokenizer, state.checkpoints, done, run.finetune,
                        run.base_model, {"mlflow_run_id": tracker.run_id, **state.layout_signature},
                        run.train.keep_checkpoints)


def mean_since_last_log(losses: list[float], done: int, start: int, log_every: int) -> float:
    """The mean loss of the steps after the last logged one up to step `done` (one step's loss is noisy: curves plot
    this); `losses` are this process's, steps start+1..done, so a resumed run averages from its first step."""
    since = done - max(start, (done - 1) // log_every * log_every)
    return sum(losses[-since:]) / since


def _finish(state: RunState) -> dict[str, Any]:
    """The last checkpoint's adapter becomes output_dir/adapter (rank 0), recorded with the DeepSpeed config."""
    import deepspeed.comm as dist

    from comet_ds.train.checkpoint import NonFiniteError

    run, tracker, output = state.run, state.tracker, Path(state.run.output_dir)
    if state.nonfinite:  # the last steps diverged: there is no final checkpoint to make the adapter from
        tracker.close(status="FAILED")
        raise NonFiniteError(f"the loss or gradient norm was not finite for the last {state.nonfinite} step(s), so "
                             "no final checkpoint or adapter was saved: lower train.lr, or check the dataset")
    final = state.checkpoints / f"step-{run.train.steps}" / "adapter"
    if state.rank == 0:
        with output_directory(output / "adapter", "comet-ds train", overwrite=True) as scratch:  # its own only
            shutil.copytree(final, scratch, dirs_exist_ok=True)
        tracker.log_artifacts(output / "adapter", "adapter")
        with as_file(run.deepspeed_file()) as deepspeed_path:  # a packaged config as a file too
            tracker.log_artifact(deepspeed_path)
        tracker.close()
    dist.barrier()
    return {"losses": state.losses, "adapter": str(output / "adapter"), "start_step": state.start,
            "mlflow": getattr(tracker, "tracking_uri", None)}  # its password redacted


# set for every process by torchrun and by the deepspeed launcher (launch/*.sh)
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def require_launcher() -> None:
    """Refuse to train outside a launcher: the process group would otherwise fail to form with a
    traceback from MPI discovery."""
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise CometConfigError(
            f"comet-ds train runs under a launcher, which sets {', '.join(missing)}: start it with "
            "`deepspeed --num_gpus N --module comet_ds.cli train --config RUN.yaml` or "
            "`launch/single_node.sh --procs N --config RUN.yaml` (--dry-run checks the config without one)")


def main_from_args(config_path: str, overrides: list[str], dry_run: bool, resume: str | None) -> None:
    from comet_ds.train.config import load_run_config

    run = load_run_config(config_path, overrides)
    if dry_run:
        print(describe(run, preflight(run, resume)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = train(run, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {len(result['losses'])} step(s) from step {result['start_step']}; "
              f"adapter: {result['adapter']}; tracking: {result['mlflow']}")
