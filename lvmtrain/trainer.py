"""Trainer: builds the components of a run, then runs the loop.

`__init__` only builds; `train()` and `train_step()` know nothing of files, W&B or which
data-parallel engine is behind the `Strategy`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lvmtrain.checkpoint import MANIFEST, STATE, CheckpointManager, rng_state, set_rng_state
from lvmtrain.config.loader import config_hash, config_to_dict
from lvmtrain.config.schema import Config, ConfigError
from lvmtrain.data.ledger import BadSampleCounter, SampleLedger
from lvmtrain.data.loader import build_eval_loader, build_train_loader, preflight, release_batch, train_order
from lvmtrain.data.order import Cursor, OrderVersionError, check_order_version
from lvmtrain.data.shards import DataError, RemoteIO, ShardSet
from lvmtrain.data.transforms import ImageNormalizer
from lvmtrain.distributed.dims import (all_reduce_max, all_reduce_mean, barrier, from_rank0, init_distributed,
                                      set_deterministic)
from lvmtrain.distributed.strategy import build_strategy
from lvmtrain.evaluate import check_labels_cover, top1, zero_shot_weights
from lvmtrain.metrics import MetricLogger, StepTimer, device_peak_flops, memory_metrics, print0
from lvmtrain.models.registry import build_model, model_family
from lvmtrain.preemption import StopRequest, restart_count
from lvmtrain.rundir import LOCK, RunBusy, RunLock, check_resume, clear_run_dir, record_segment
from lvmtrain.tasks import build_task

CONSOLE_KEYS = ("loss", "lr", "samples_per_s", "mfu", "eval/top1")
# Values every rank holds identically (data/* counts are already summed over ranks): logged as
# they are, not averaged over ranks.
SHARED_KEYS = ("lr", "samples_seen", "epoch")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or inf; the message names the step."""


def host_values(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars on the host, in one device-to-host copy."""
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in values.values()]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return dict(zip(values, torch.stack([t.to(device) for t in tensors]).tolist())) if tensors else {}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dims = dims = init_distributed(cfg.parallel, cfg.train.threads)
        # NOTE: rank 0 counts the shards (or reads the dataset index) once and shares the counts;
        # input problems surface on every rank before the run directory exists.
        io = RemoteIO.from_config(cfg.data)
        train_shards = from_rank0(lambda: ShardSet.from_spec(cfg.data.train, io), DataError)
        val_shards = from_rank0(lambda: ShardSet.from_spec(cfg.data.val, io), DataError) if cfg.data.val else None
        # NOTE: before the run directory: a backend that cannot work here says so first.
        self.strategy = build_strategy(cfg.parallel, dims, cfg.train.precision)
        self.global_batch = cfg.data.batch_size * dims.world * cfg.train.grad_accum_steps
        samples_per_epoch = len(train_order(train_shards, cfg.data, cfg.train.seed, 0))
        steps_per_epoch = samples_per_epoch // self.global_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: global batch {self.global_batch} is larger than the "
                              f"{samples_per_epoch} samples of an epoch of data.train")
        self.total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
        self.run_dir = Path(cfg.log.dir) / cfg.run.name
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, dims, info={
            "backend": cfg.parallel.backend, "config_sha256": config_hash(cfg)})
        created = not self.run_dir.exists()
        self._lock = self._own_run_dir()
        try:
            self._build(train_shards, val_shards, steps_per_epoch)
        except BaseException:
            # NOTE: a run that never started leaves nothing behind (only our lock was written)
            if created and dims.is_main and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _build(self, train_shards: ShardSet, val_shards: ShardSet | None, steps_per_epoch: int) -> None:
        """Every check first (the resume's config, the model, the data); then the run directory
        is written (or, with run.overwrite, emptied) and the checkpoint loaded."""
        cfg, dims = self.cfg, self.dims
        fresh = cfg.run.overwrite and restart_count() == 0  # NOTE: a restart resumes its own run
        resume = None if fresh else self._find_resume()
        if cfg.train.deterministic:
            set_deterministic()
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        with self.strategy.init_context():
            model = build_model(m.name, image_size=m.image_size, patch_size=m.patch_size,
                                num_classes=m.num_classes, global_pool=m.global_pool,
                                drop_path_rate=m.drop_path_rate, context_length=m.context_length)
        model.set_grad_checkpointing(m.grad_checkpointing)
        self.family = model_family(m.name)
        self.task = build_task(self.family, cfg.optim)
        self.flops_per_sample = model.flops_per_sample()
        # NOTE: ds_numel: under zero.Init (meta_init, ZeRO-3) the parameters are already partitions.
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.strategy.setup(model, cfg.optim, self.total_steps, micro_batch=cfg.data.batch_size,
                            accum=cfg.train.grad_accum_steps)
        self.tokenizer = None
        if self.family == "clip":
            from lvmtrain.data.tokenizer import CLIPTokenizer

            self.tokenizer = CLIPTokenizer(context_length=model.context_length)
        self.image_size = model.image_size
        self.normalize = ImageNormalizer(cfg.data.mean, cfg.data.std)
        first = train_order(train_shards, cfg.data, cfg.train.seed, 0).slice(0, 4 * self.global_batch)
        print0(from_rank0(lambda: preflight(train_shards, cfg.data, image_size=self.image_size,
                                            tokenizer=self.tokenizer, first=first), DataError), enabled=dims.is_main)
        if val_shards is not None:  # NOTE: rank 0 reads the labels once; a refusal stops every rank
            n_classes, key = ((len(cfg.eval.class_names), "eval.class_names") if self.family == "clip"
                              else (model.num_classes, "model.num_classes"))
            summary = from_rank0(lambda: check_labels_cover(val_shards, n_classes, key, label_key=cfg.data.label_key),
                                 ConfigError, DataError)
            print0(summary, enabled=dims.is_main)

        self.step, self.samples_seen, self.cursor, wandb_id = 0, 0, Cursor(), None
        self._prepare_run_dir(fresh=fresh, step=resume[1] if resume else 0)
        self.last_eval: dict[str, float] = {}
        self.stopped_by: str | None = None  # the signal that stopped the run early, once saved
        # The first step whose loss or gradient norm was not finite (0: none), kept on the device.
        self.first_nonfinite = torch.zeros((), dtype=torch.int64, device=dims.device)
        self.bad_samples = BadSampleCounter(cfg.data.max_bad_fraction, train_shards.problems, dims.device)
        for _, _, message in train_shards.problems if dims.is_main else ():
            print(f"lvmtrain: warning: {message}", file=sys.stderr, flush=True)
        if resume is not None:
            state = self.checkpoints.load(resume[0], self.strategy.load_template())
            self.strategy.load_state_dict(state["strategy"])
            self.bad_samples.load_state_dict(state["bad_samples"], rank=dims.rank)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            self.cursor, wandb_id = Cursor.from_state(state["cursor"]), state.get("wandb_id")
            print0(f"resumed from {resume[0]} at step {self.step}", enabled=dims.is_main)
        self.ledger = SampleLedger(self.run_dir, dims.rank, self.step, dims.device) if cfg.data.ledger else None

        self.train_loader = build_train_loader(train_shards, cfg.data, dims, image_size=self.image_size,
                                               tokenizer=self.tokenizer, accum=cfg.train.grad_accum_steps,
                                               seed=cfg.train.seed, start=self.cursor)
        self.eval_loader = None if val_shards is None else build_eval_loader(
            val_shards, cfg.data, dims, image_size=self.image_size, batch_size=cfg.eval.batch_size)
        self.timer = StepTimer(dims.device)
        self.peak_flops, peak_source = device_peak_flops(dims.device, cfg.train.precision, cfg.log.peak_tflops)
        self.logger = MetricLogger(cfg.log, self.run_dir, enabled=dims.is_main, run_name=cfg.run.name,
                                   config=config_to_dict(cfg), total_steps=self.total_steps,
                                   start_step=self.step, wandb_id=wandb_id)
        print0(f"run {self.run_dir}: {self.family} {m.name}, {self.n_params:,} "
               f"parameters, {dims.world} rank(s) on {dims.device}, global batch {self.global_batch}, "
               f"{self.total_steps} steps ({steps_per_epoch} per epoch); {self.flops_per_sample / 1e9:.3g} "
               f"GFLOP per sample, device peak {self.peak_flops / 1e12:.3g} TFLOP/s ({peak_source})",
               enabled=dims.is_main)

    def _own_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run directory for the life of the job; a second job is refused on
        every rank at once, naming the holder."""
        lock = RunLock(self.run_dir)
        from_rank0(lock.acquire, RunBusy)
        return lock if self.dims.is_main else None

    def _find_resume(self) -> tuple[Path, int] | None:
        """(checkpoint, its step) to resume, after rank 0 has checked that its config is this
        run's (schema.RESUMABLE); the refusal reaches every rank."""
        cfg = self.cfg
        if cfg.checkpoint.resume == "none" and self.checkpoints.dir.is_dir() and any(self.checkpoints.dir.glob("step_*")):
            raise ConfigError(f"{self.run_dir} already holds checkpoints; resume it "
                              f"(checkpoint.resume=auto), pick another run.name, or set run.overwrite=true")
        path = self.checkpoints.find_resume()
        if path is None:
            return None

        def check() -> tuple[Path, int]:
            manifest = json.loads((path / MANIFEST).read_text())
            state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            check_resume(cfg, path, state["config"], manifest["world_size"], world=self.dims.world,
                         global_batch=self.global_batch, total_steps=self.total_steps, step=manifest["step"])
            check_order_version(state["cursor"])
            return path, manifest["step"]

        return from_rank0(check, ConfigError, OrderVersionError)

    def _prepare_run_dir(self, *, fresh: bool, step: int) -> None:
        """Rank 0, once every check has passed: empty the old run (run.overwrite), write the
        accepted config and add this segment to the run's history."""
        barrier()  # every rank has looked before rank 0 deletes anything
        if self.dims.is_main:
            if fresh:
                clear_run_dir(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record_segment(self.cfg, self.run_dir, step=step, world=self.dims.world)
        barrier()

    def train(self) -> dict[str, float]:
        """Train to `total_steps`, or until a stop signal: then save this step and return early
        with `stopped_by` set."""
        stop = StopRequest()  # NOTE: before the loader forks its workers, which ignore the signals
        try:
            self._loop(stop)
        finally:
            stop.close()
            # NOTE: once stopped, the handlers stay (see `requeue_exit_code`): a rank waiting
            # at the barrier below for rank 0 must not die of srun's SIGTERM.
            if not self.stopped_by:
                stop.restore()
        self.checkpoints.wait()
        if self.step == self.total_steps:
            self.logger.log_checkpoint(self.checkpoints.dir / f"step_{self.step:08d}", self.step)
        self.logger.close()
        barrier()  # rank 0 has finished W&B and the checkpoint before any rank exits
        return self.last_eval

    def _loop(self, stop: StopRequest) -> None:
        batches = iter(self.train_loader)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.cfg.train.grad_accum_steps)]
            self.timer.add("data_wait", time.perf_counter() - t0)
            step_metrics = self.train_step(micro)
            self.step += 1
            self._note_nonfinite(step_metrics)
            self.samples_seen += self.global_batch
            self.cursor = Cursor(*micro[-1]["cursor"])
            for batch in micro:
                self.bad_samples.update(batch)
            if self.ledger:
                self.ledger.record(self.step, micro)
            window_steps += 1
            self.logger.advance(self.step)
            if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                self._stop_if_nonfinite()
                metrics = host_values(step_metrics)  # NOTE: the loop's only read of device values
                metrics["lr"] = self.strategy.lr
                metrics.update(self._window_metrics(window_steps, time.perf_counter() - window_start))
                self._log(metrics)
                window_start, window_steps = time.perf_counter(), 0
            self._maybe_evaluate()
            self.checkpoints.check()
            self.stopped_by = stop.poll() if self.step < self.total_steps else None
            if self.stopped_by or self.checkpoints.should_save(self.step, self.total_steps):
                self._stop_if_nonfinite()  # NOTE: never a checkpoint of a diverged model
                self.checkpoints.save(self.step, self.state_dict())
            if self.stopped_by:
                print0(f"stopped by {self.stopped_by} at step {self.step} of {self.total_steps}; "
                       f"saved {self.checkpoints.dir}/step_{self.step:08d}", enabled=self.dims.is_main)
                return

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step; its metrics stay on the device (reading them would wait for the
        step to finish: the loop reads them at log steps only)."""
        n = len(micro_batches)
        if n > 1 and self.task.batch_coupled:
            with self.timer("fwd_bwd"):
                totals = self._coupled_step([self._to_device(b) for b in micro_batches])
        else:
            totals = {}
            for i, batch in enumerate(micro_batches):
                batch = self._to_device(batch)
                with self.timer("fwd_bwd"), self.strategy.micro_step(sync_grads=i == n - 1):
                    out = self.task(self.strategy.model, batch)
                    self.strategy.backward(out["loss"] / n)
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + v.detach() / n
        with self.timer("optimizer"):
            grad_norm = self.strategy.step()
        return {**totals, "grad_norm": grad_norm}

    def _coupled_step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """Accumulation for a loss that couples a batch's samples (CLIP): the loss of the whole
        accumulated batch, as if it were one micro-batch, at the cost of one extra forward.

        Features of every micro-batch first without gradients; the loss on all of them and its
        gradient with respect to the features; then each micro-batch again with gradients,
        back-propagating its slice of that gradient (open_clip's accum_freq; the gradient cache of
        Gao et al. 2021). The RNG is replayed so both forwards drop the same paths.
        """
        model, task = self.strategy.model, self.task
        rng, cached = [], []
        with torch.no_grad(), self.strategy.autocast():
            for batch in batches:
                rng.append(rng_state())
                cached.append(task.features(model, batch))
        after = rng_state()
        feats = {k: torch.cat([f[k] for f in cached]).requires_grad_() for k in task.feature_keys}
        feats["logit_scale"] = cached[0]["logit_scale"].clone().requires_grad_()
        out = task.loss(feats)
        out["loss"].backward()
        sizes = [f[task.feature_keys[0]].shape[0] for f in cached]
        grads = {k: feats[k].grad.split(sizes) for k in task.feature_keys}
        for i, batch in enumerate(batches):
            set_rng_state(rng[i])
            with self.strategy.micro_step(sync_grads=i == len(batches) - 1):
                f = task.features(model, batch)
                surrogate = sum((f[k] * grads[k][i]).sum() for k in task.feature_keys)
                if i == 0:  # the temperature is shared by every micro-batch: its gradient once
                    surrogate = surrogate + (f["logit_scale"] * feats["logit_scale"].grad).sum()
                self.strategy.backward(surrogate)
        set_rng_state(after)
        return {k: v.detach() for k, v in out.items()}

    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval.every
        if self.eval_loader is None or not (self.step == self.total_steps or (every and self.step % every == 0)):
            return
        self._stop_if_nonfinite()
        model = self.strategy.unwrapped()
        classifier = None
        if self.family == "clip":
            classifier = zero_shot_weights(model, self.tokenizer, self.cfg.eval.class_names,
                                           self.cfg.eval.templates, self.dims.device)
        result = top1(model, self.eval_loader, self.dims.device, classifier=classifier,
                      autocast=self.strategy.autocast, normalize=self.normalize)
        self.last_eval = {"eval/top1": result["top1"], "eval/samples": result["samples"]}
        self.logger.log(self.step, self.last_eval, console_keys=("eval/top1", "eval/samples"))

    def _note_nonfinite(self, metrics: dict[str, torch.Tensor]) -> None:
        """Remember the first step whose loss or gradient norm is NaN or inf, on the device (no
        sync); `_stop_if_nonfinite` reads it where the loop syncs anyway."""
        first = self.first_nonfinite
        finite = torch.isfinite(metrics["loss"]) & torch.isfinite(torch.as_tensor(metrics["grad_norm"]).to(first.device))
        self.first_nonfinite = torch.where((first == 0) & ~finite, self.step, first)

    def _stop_if_nonfinite(self) -> None:
        """Collective (at log, eval and save points, which every rank reaches together): stop the
        run once any rank has seen a non-finite loss or gradient norm, before it is evaluated or
        saved. Training on would only spread NaN through the weights."""
        first = self.first_nonfinite.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            first = torch.where(first == 0, torch.iinfo(torch.int64).max, first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.int64).max, 0, first)
        step = int(first.item())
        if step:
            latest = self.checkpoints.dir / "latest"
            kept = f"{self.checkpoints.dir}/{latest.read_text().strip()}" if latest.exists() else "none yet"
            raise TrainingDiverged(
                f"the loss or gradient norm is not finite from step {step} (seen at step {self.step}); stopped "
                f"without evaluating or saving (newest checkpoint: {kept}). Lower optim.lr or raise "
                f"optim.warmup_steps, look at that step's samples (data.ledger=true names them), or train in fp32")

    def _to_device(self, batch: dict) -> dict:
        out = {k: batch[k].to(self.dims.device, non_blocking=True) for k in self.task.inputs}
        out["image"] = self.normalize(out["image"])  # a new tensor: the loader's buffer is free
        release_batch(batch)
        return out

    def _window_metrics(self, steps: int, elapsed: float) -> dict[str, float]:
        """Throughput, MFU, the step's time by phase, memory and data counts over the last
        `steps` steps. Per-device rates are this rank's (averaged over ranks by `_log`)."""
        per_device = steps * self.global_batch / self.dims.world / elapsed
        flops = per_device * self.flops_per_sample
        out = {"samples_per_s": per_device * self.dims.world, "samples_per_s_per_device": per_device,
               # one image per sample for both tasks; named apart for dashboards that compare by images
               "images_per_s": per_device * self.dims.world, "images_per_s_per_device": per_device,
               "tflops_per_device": flops / 1e12, "time/step_s": elapsed / steps,
               "samples_seen": self.samples_seen, "epoch": self.cursor.epoch}
        if self.peak_flops:
            out["mfu"] = flops / self.peak_flops
        phases = self.timer.read()
        for phase in ("data_wait", "fwd_bwd", "optimizer"):
            out[f"time/{phase}_s"] = phases.get(phase, 0.0) / steps
        out["data_wait_share"] = phases.get("data_wait", 0.0) / elapsed
        out.update(memory_metrics(self.dims.device))
        out.update(self.bad_samples.totals(self.samples_seen))
        return out

    def _log(self, metrics: dict[str, float]) -> None:
        """Means over ranks, except values every rank holds alike (as they are) and peak memory
        (the largest rank's)."""
        is_shared = lambda k: k in SHARED_KEYS or k.startswith("data/")  # noqa: E731
        peaks = {k: v for k, v in metrics.items() if k.startswith("mem/")}
        reduced = all_reduce_mean({k: v for k, v in metrics.items() if not is_shared(k) and k not in peaks},
                                  self.dims.device)
        shared = {k: v for k, v in metrics.items() if is_shared(k)}
        if peaks:
            t = all_reduce_max(torch.tensor(list(peaks.values()), dtype=torch.float64, device=self.dims.device))
            peaks = dict(zip(peaks, t.tolist()))
        self.logger.log(self.step, {**reduced, **shared, **peaks}, console_keys=CONSOLE_KEYS)

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run (collective: every rank calls it)."""
        return {"strategy": self.strategy.state_dict(), "step": self.step, "samples_seen": self.samples_seen,
                "cursor": self.cursor.state_dict(), "bad_samples": self.bad_samples.state_dict(),
                "wandb_id": self.logger.wandb_id, "config": config_to_dict(self.cfg)}
