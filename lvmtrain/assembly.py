"""Building a run's parts, apart from the loop that trains them (`Trainer`).

`build_run(cfg)` does every check first (the resume's config, the model, the data), then writes
the run directory (or, with run.overwrite, empties it) and loads the checkpoint; a test can build
a run in process and hand it to `Trainer`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvmtrain.checkpoint import MANIFEST, STATE, CheckpointManager
from lvmtrain.config.loader import config_hash, config_to_dict
from lvmtrain.config.schema import Config, ConfigError
from lvmtrain.data.ledger import BadSampleCounter, SampleLedger
from lvmtrain.data.loader import build_train_loader, preflight, train_order
from lvmtrain.data.order import Cursor, OrderVersionError, check_order_version
from lvmtrain.data.shards import DataError, RemoteIO, ShardSet
from lvmtrain.data.transforms import ImageNormalizer
from lvmtrain.distributed.dims import Dims, barrier, from_rank0, init_distributed, set_deterministic
from lvmtrain.distributed.strategy import Strategy, build_strategy
from lvmtrain.evaluation import EvalSet, Evaluator, check_labels_cover, resolve_sets
from lvmtrain.evaluation.sets import LEGACY
from lvmtrain.metrics import MetricLogger, device_peak_flops, print0
from lvmtrain.models.registry import build_model, text_context_length
from lvmtrain.models.vit import unmask_patches_from
from lvmtrain.preemption import restart_count
from lvmtrain.rundir import LOCK, RunBusy, RunLock, check_resume, clear_run_dir, record_segment
from lvmtrain.tasks import TASKS, Task, build_task, task_name


@dataclass
class RunParts:
    """What a `Trainer` trains with, and where it starts."""

    cfg: Config
    dims: Dims
    run_dir: Path
    lock: RunLock | None
    """Rank 0's hold on the run directory, for the life of the job."""
    strategy: Strategy
    task: Task
    normalize: ImageNormalizer
    train_loader: torch.utils.data.DataLoader
    evaluator: Evaluator | None
    checkpoints: CheckpointManager
    logger: MetricLogger
    ledger: SampleLedger | None
    bad_samples: BadSampleCounter
    total_steps: int
    global_batch: int
    peak_flops: float
    step: int = 0
    samples_seen: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    step_hooks: list = field(default_factory=list)
    """Callables the loop calls with each step's number before running it (model schedules)."""
    rng: dict | None = None
    """The RNG states the checkpoint saved for this rank: restored as the loop starts, so nothing
    built in between (a peak-FLOPs probe, a loader) shifts the draws of dropout masks."""


def build_run(cfg: Config) -> RunParts:
    """Every part of a run, resumed from its newest checkpoint when there is one (collective)."""
    dims = init_distributed(cfg.parallel, cfg.train.threads)
    # NOTE: rank 0 counts the shards (or reads the dataset index) once and shares the counts;
    # input problems surface on every rank before the run directory exists.
    io = RemoteIO.from_config(cfg.data)
    train_shards = from_rank0(lambda: ShardSet.from_spec(cfg.data.train, io), DataError)
    eval_sets = resolve_sets(cfg, TASKS[task_name(cfg)].eval_kind, io)
    # NOTE: before the run directory: a backend that cannot work here says so first.
    strategy = build_strategy(cfg.parallel, dims, cfg.train.precision)
    global_batch = cfg.data.batch_size * dims.world * cfg.train.grad_accum_steps
    samples_per_epoch = len(train_order(train_shards, cfg.data, cfg.train.seed, 0))
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: global batch {global_batch} is larger than the "
                          f"{samples_per_epoch} samples of an epoch of data.train")
    total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    run_dir = Path(cfg.log.dir) / cfg.run.name
    checkpoints = CheckpointManager(cfg.checkpoint, run_dir, dims, info={
        "backend": cfg.parallel.backend, "config_sha256": config_hash(cfg)})
    created = not run_dir.exists()
    lock = RunLock(run_dir)
    from_rank0(lock.acquire, RunBusy)
    try:
        return _build(cfg, dims, run_dir, lock if dims.is_main else None, strategy, checkpoints, train_shards,
                      eval_sets, total_steps, global_batch, steps_per_epoch)
    except BaseException:
        # NOTE: a run that never started leaves nothing behind (only our lock was written)
        if created and dims.is_main and [p.name for p in run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def build_task_and_model(cfg: Config, strategy: Strategy) -> tuple[Task, torch.nn.Module]:
    """The run's objective and its plain model (built in the strategy's init context)."""
    m = cfg.model
    task = build_task(cfg, context_length=text_context_length(m.name, m.context_length))
    args = dict(image_size=m.image_size, patch_size=m.patch_size, num_classes=m.num_classes, global_pool=m.global_pool,
                drop_path_rate=m.drop_path_rate, context_length=m.context_length, patch_dropout=m.patch_dropout)
    with strategy.init_context():
        backbone = build_model(m.name, **{**args, **task.model_args()})
        if m.init_from:  # NOTE: before wrapping: DINO's teacher starts as this student
            from lvmtrain.models.init_from import init_backbone

            if any(p.is_meta or hasattr(p, "ds_numel") for p in backbone.parameters()):
                raise ConfigError("model.init_from with parallel.meta_init: the weights load into a whole model; "
                                  "set parallel.meta_init=false")
            print0(init_backbone(backbone, m.init_from), enabled=strategy.dims.is_main)
        model = task.wrap_model(backbone)
    return task, model


def _build(cfg: Config, dims: Dims, run_dir: Path, lock: RunLock | None, strategy: Strategy,
           checkpoints: CheckpointManager, train_shards: ShardSet, eval_sets: list[EvalSet], total_steps: int,
           global_batch: int, steps_per_epoch: int) -> RunParts:
    fresh = cfg.run.overwrite and restart_count() == 0  # NOTE: a restart resumes its own run
    resume = None if fresh else _find_resume(cfg, dims, checkpoints, global_batch, total_steps)
    if cfg.train.deterministic:
        set_deterministic()
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    task, model = build_task_and_model(cfg, strategy)
    task.total_steps = total_steps
    model.set_grad_checkpointing(m.grad_checkpointing)
    flops_per_sample = model.flops_per_sample()
    step_hooks = []
    if m.patch_dropout and m.patch_dropout_unmasked:
        step_hooks.append(unmask_patches_from(model, total_steps - round(m.patch_dropout_unmasked * total_steps) + 1))
    # NOTE: ds_numel: under zero.Init (meta_init, ZeRO-3) the parameters are already partitions.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    strategy.setup(model, cfg.optim, total_steps, micro_batch=cfg.data.batch_size, accum=cfg.train.grad_accum_steps)
    image_size = model.image_size
    # NOTE: the crops a task's "views" field asks the loader for (DINO's global and local crops)
    views = task.crops if "views" in task.fields else None
    # NOTE: rank 0 alone plans the first 4 global batches (524k positions at 4,096 ranks) and probes them
    print0(from_rank0(lambda: preflight(
        train_shards, cfg.data, image_size=image_size, fields=task.fields, tokenizer=task.tokenizer, views=views,
        first=train_order(train_shards, cfg.data, cfg.train.seed, 0).slice(0, 4 * global_batch)), DataError),
        enabled=dims.is_main)
    for s, (n_classes, key) in _known_classes(eval_sets, model):  # NOTE: rank 0 reads the labels once
        source = "data.val" if s.name == LEGACY else f"eval set '{s.name}'"
        summary = from_rank0(lambda: check_labels_cover(s.data, n_classes, key, source=source,
                                                        label_key=cfg.data.label_key), ConfigError, DataError)
        print0(summary, enabled=dims.is_main)

    _prepare_run_dir(cfg, dims, run_dir, fresh=fresh, step=resume[1] if resume else 0)
    bad_samples = BadSampleCounter(cfg.data.max_bad_fraction, train_shards.problems, dims.device)
    for _, _, message in train_shards.problems if dims.is_main else ():
        print(f"lvmtrain: warning: {message}", file=sys.stderr, flush=True)
    step, samples_seen, cursor, wandb_id, rng = 0, 0, Cursor(), None, None
    if resume is not None:
        state = checkpoints.load(resume[0], {"strategy": strategy.load_template()})
        strategy.load_state_dict(state["strategy"])
        task.load_state_dict(state.get("task", {}))
        bad_samples.load_state_dict(state["bad_samples"], rank=dims.rank)
        step, samples_seen = state["step"], state["samples_seen"]
        cursor, wandb_id, rng = Cursor.from_state(state["cursor"]), state.get("wandb_id"), state["rng"]
        print0(f"resumed from {resume[0]} at step {step}", enabled=dims.is_main)
    train_loader = build_train_loader(train_shards, cfg.data, dims, image_size=image_size, fields=task.fields,
                                      tokenizer=task.tokenizer, views=views, accum=cfg.train.grad_accum_steps,
                                      seed=cfg.train.seed, start=cursor)
    evaluator = Evaluator(eval_sets, cfg.data, dims, image_size=image_size, batch_size=cfg.eval.batch_size,
                          tokenizer=task.tokenizer) if eval_sets else None
    peak_flops, peak_source = device_peak_flops(dims.device, cfg.train.precision, cfg.log.peak_tflops)
    logger = MetricLogger(cfg.log, run_dir, enabled=dims.is_main, run_name=cfg.run.name, config=config_to_dict(cfg),
                          total_steps=total_steps, start_step=step, wandb_id=wandb_id)
    print0(f"run {run_dir}: {task.name} on {m.name}, {n_params:,} parameters, {dims.world} rank(s) on "
           f"{dims.device}, global batch {global_batch}, {total_steps} steps ({steps_per_epoch} per epoch); "
           f"{flops_per_sample / 1e9:.3g} GFLOP per sample, device peak {peak_flops / 1e12:.3g} TFLOP/s "
           f"({peak_source})", enabled=dims.is_main)
    return RunParts(
        cfg=cfg, dims=dims, run_dir=run_dir, lock=lock, strategy=strategy, task=task,
        normalize=ImageNormalizer(cfg.data.mean, cfg.data.std), train_loader=train_loader, evaluator=evaluator,
        checkpoints=checkpoints, logger=logger,
        ledger=SampleLedger(run_dir, dims.rank, step, dims.device) if cfg.data.ledger else None,
        bad_samples=bad_samples, total_steps=total_steps, global_batch=global_batch,
        peak_flops=peak_flops, step=step, samples_seen=samples_seen, cursor=cursor,
        step_hooks=step_hooks, rng=rng)


def _known_classes(sets: list[EvalSet], model) -> list[tuple[EvalSet, tuple[int, str]]]:
    """(set, (its classes, the key that sets them)) of the sets whose labels must lie below a known
    count: checked before step 1."""
    out = []
    for s in sets:
        where = "eval.class_names" if s.name == LEGACY else f"the class names of eval set '{s.name}'"
        if s.kind == "classify":
            out.append((s, (model.num_classes, "model.num_classes")))
        elif s.class_names:
            out.append((s, (len(s.class_names), where)))
    return out


def _find_resume(cfg: Config, dims: Dims, checkpoints: CheckpointManager, global_batch: int,
                 total_steps: int) -> tuple[Path, int] | None:
    """(checkpoint, its step) to resume, after rank 0 has checked that its config is this run's
    (schema.RESUMABLE); the refusal reaches every rank."""
    run_dir = checkpoints.dir.parent
    if cfg.checkpoint.resume == "none" and checkpoints.dir.is_dir() and any(checkpoints.dir.glob("step_*")):
        raise ConfigError(f"{run_dir} already holds checkpoints; resume it "
                          f"(checkpoint.resume=auto), pick another run.name, or set run.overwrite=true")
    path = checkpoints.find_resume()
    if path is None:
        return None

    def check() -> tuple[Path, int]:
        manifest = json.loads((path / MANIFEST).read_text())
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        check_resume(cfg, path, state["config"], manifest["world_size"], world=dims.world,
                     global_batch=global_batch, total_steps=total_steps, step=manifest["step"])
        check_order_version(state["cursor"])
        return path, manifest["step"]

    return from_rank0(check, ConfigError, OrderVersionError)


def _prepare_run_dir(cfg: Config, dims: Dims, run_dir: Path, *, fresh: bool, step: int) -> None:
    """Rank 0, once every check has passed: empty the old run (run.overwrite), write the accepted
    config and add this segment to the run's history."""
    barrier()  # every rank has looked before rank 0 deletes anything
    if dims.is_main:
        if fresh:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_segment(cfg, run_dir, step=step, world=dims.world)
    barrier()
