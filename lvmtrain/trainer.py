"""Trainer: builds the components of a run, then runs the loop.

`__init__` only builds; `train()` and `train_step()` know nothing of files, W&B or which
data-parallel engine is behind the `Strategy`.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from lvmtrain.checkpoint import CheckpointManager
from lvmtrain.config.loader import config_to_dict, save_config
from lvmtrain.config.schema import Config, ConfigError
from lvmtrain.data.ledger import BadSampleCounter, SampleLedger
from lvmtrain.data.loader import build_eval_loader, build_train_loader, preflight, release_batch
from lvmtrain.data.shards import Cursor, ShardSet, epoch_size
from lvmtrain.data.transforms import ImageNormalizer
from lvmtrain.distributed.dims import all_reduce_mean, barrier, init_distributed
from lvmtrain.distributed.strategy import build_strategy
from lvmtrain.evaluate import top1, zero_shot_weights
from lvmtrain.metrics import MetricLogger, print0
from lvmtrain.models.registry import build_model, model_family
from lvmtrain.tasks import build_task

CONSOLE_KEYS = ("loss", "lr", "samples_per_s", "eval/top1")
# Values every rank holds identically (data/* counts are already summed over ranks): logged as
# they are, not averaged over ranks.
SHARED_KEYS = ("lr", "samples_seen", "epoch")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Input problems surface before the process group or the run directory exist.
        train_shards = ShardSet.from_spec(cfg.data.train)
        val_shards = ShardSet.from_spec(cfg.data.val) if cfg.data.val else None
        self.dims = dims = init_distributed(cfg.parallel, cfg.train.threads)
        self.global_batch = cfg.data.batch_size * dims.world * cfg.train.grad_accum_steps
        samples_per_epoch = epoch_size(train_shards.source_ranges(), block=cfg.data.shuffle_block,
                                       weights=cfg.data.train_weights)
        steps_per_epoch = samples_per_epoch // self.global_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: global batch {self.global_batch} is larger than the "
                              f"{samples_per_epoch} samples of an epoch of data.train")
        self.total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
        self.run_dir = Path(cfg.log.dir) / cfg.run.name
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, dims)
        self._prepare_run_dir()

        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        model = build_model(m.name, image_size=m.image_size, patch_size=m.patch_size, num_classes=m.num_classes,
                            global_pool=m.global_pool, drop_path_rate=m.drop_path_rate,
                            context_length=m.context_length)
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.family = model_family(m.name)
        self.task = build_task(self.family, cfg.optim)
        self.flops_per_sample = model.flops_per_sample()
        self.strategy = build_strategy(cfg.parallel, dims, cfg.train.precision)
        self.strategy.setup(model, cfg.optim, self.total_steps)

        self.step, self.samples_seen, self.cursor, wandb_id = 0, 0, Cursor(), None
        self.last_eval: dict[str, float] = {}
        self.bad_samples = BadSampleCounter(cfg.data.max_bad_fraction, train_shards.problems, dims.device)
        for _, _, message in train_shards.problems if dims.is_main else ():
            print(f"lvmtrain: warning: {message}", file=sys.stderr, flush=True)
        resume = self.checkpoints.find_resume()
        if resume is not None:
            state = self.checkpoints.load(resume)
            self.strategy.load_state_dict(state["strategy"])
            self.bad_samples.load_state_dict(state["bad_samples"], rank=dims.rank)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            self.cursor, wandb_id = Cursor.from_state(state["cursor"]), state.get("wandb_id")
            print0(f"resumed from {resume} at step {self.step}", enabled=dims.is_main)
        self.ledger = SampleLedger(self.run_dir, dims.rank, self.step, dims.device) if cfg.data.ledger else None

        self.tokenizer = None
        if self.family == "clip":
            from lvmtrain.data.tokenizer import CLIPTokenizer

            self.tokenizer = CLIPTokenizer(context_length=model.context_length)
        self.image_size = model.image_size
        self.normalize = ImageNormalizer(cfg.data.mean, cfg.data.std)
        print0(preflight(train_shards, cfg.data, image_size=self.image_size, tokenizer=self.tokenizer),
               enabled=dims.is_main)
        self.train_loader = build_train_loader(train_shards, cfg.data, dims, image_size=self.image_size,
                                               tokenizer=self.tokenizer, accum=cfg.train.grad_accum_steps,
                                               seed=cfg.train.seed, start=self.cursor)
        self.eval_loader = None if val_shards is None else build_eval_loader(
            val_shards, cfg.data, dims, image_size=self.image_size, batch_size=cfg.eval.batch_size)
        self.logger = MetricLogger(cfg.log, self.run_dir, enabled=dims.is_main, run_name=cfg.run.name,
                                   config=config_to_dict(cfg), wandb_id=wandb_id)
        print0(f"run {self.run_dir}: {self.family} {m.name}, {sum(p.numel() for p in model.parameters()):,} "
               f"parameters, {dims.world} rank(s) on {dims.device}, global batch {self.global_batch}, "
               f"{self.total_steps} steps ({steps_per_epoch} per epoch)", enabled=dims.is_main)

    def _prepare_run_dir(self) -> None:
        """Create `log.dir/run.name/` and write the resolved config; refuse to clobber a run."""
        cfg = self.cfg
        if cfg.checkpoint.resume == "none" and not cfg.run.overwrite and self.checkpoints.dir.is_dir() \
                and any(self.checkpoints.dir.glob("step_*")):
            raise ConfigError(f"{self.run_dir} already holds checkpoints; resume it "
                              f"(checkpoint.resume=auto), pick another run.name, or set run.overwrite=true")
        barrier()  # every rank has looked before rank 0 deletes anything
        if self.dims.is_main:
            if cfg.run.overwrite and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()

    def train(self) -> dict[str, float]:
        batches = iter(self.train_loader)
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.cfg.train.grad_accum_steps)]
            data_wait += time.perf_counter() - t0
            metrics = self.train_step(micro)
            self.step += 1
            self.samples_seen += self.global_batch
            self.cursor = Cursor(*micro[-1]["cursor"])
            for batch in micro:
                self.bad_samples.update(batch)
            if self.ledger:
                self.ledger.record(self.step, micro)
            window_steps += 1
            if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics.update(self._throughput(window_steps, elapsed), data_wait_share=data_wait / elapsed)
                metrics.update(self.bad_samples.totals(self.samples_seen))
                self._log(metrics)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            self._maybe_evaluate()
            if self.checkpoints.should_save(self.step, self.total_steps):
                self.checkpoints.save(self.step, self.state_dict())
        self.logger.close()
        return self.last_eval

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            with self.strategy.micro_step(sync_grads=i == len(micro_batches) - 1):
                out = self.task(self.strategy.model, batch)
                self.strategy.backward(out["loss"] / len(micro_batches))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.item() / len(micro_batches)
        grad_norm = self.strategy.step()
        return {**totals, "grad_norm": grad_norm.item(), "lr": self.strategy.lr}

    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval.every
        if self.eval_loader is None or not (self.step == self.total_steps or (every and self.step % every == 0)):
            return
        model = self.strategy.unwrapped()
        classifier = None
        if self.family == "clip":
            classifier = zero_shot_weights(model, self.tokenizer, self.cfg.eval.class_names,
                                           self.cfg.eval.templates, self.dims.device)
        result = top1(model, self.eval_loader, self.dims.device, classifier=classifier,
                      autocast=self.strategy.autocast, normalize=self.normalize)
        self.last_eval = {"eval/top1": result["top1"], "eval/samples": result["samples"]}
        self.logger.log(self.step, self.last_eval, console_keys=("eval/top1", "eval/samples"))

    def _to_device(self, batch: dict) -> dict:
        out = {k: batch[k].to(self.dims.device, non_blocking=True) for k in self.task.inputs}
        out["image"] = self.normalize(out["image"])  # a new tensor: the loader's buffer is free
        release_batch(batch)
        return out

    def _throughput(self, steps: int, elapsed: float) -> dict[str, float]:
        samples_per_s = steps * self.global_batch / elapsed
        return {"samples_per_s": samples_per_s, "samples_per_s_per_device": samples_per_s / self.dims.world,
                "samples_seen": self.samples_seen, "epoch": self.cursor.epoch,
                "tflops_per_device": samples_per_s * self.flops_per_sample / self.dims.world / 1e12}

    def _log(self, metrics: dict[str, float]) -> None:
        is_shared = lambda k: k in SHARED_KEYS or k.startswith("data/")  # noqa: E731
        reduced = all_reduce_mean({k: v for k, v in metrics.items() if not is_shared(k)}, self.dims.device)
        shared = {k: v for k, v in metrics.items() if is_shared(k)}
        self.logger.log(self.step, {**reduced, **shared}, console_keys=CONSOLE_KEYS)

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run (collective: every rank calls it)."""
        return {"strategy": self.strategy.state_dict(), "step": self.step, "samples_seen": self.samples_seen,
                "cursor": self.cursor.state_dict(), "bad_samples": self.bad_samples.state_dict(),
                "wandb_id": self.logger.wandb_id, "config": config_to_dict(self.cfg)}
