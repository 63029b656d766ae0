"""Trainer: the loop over a run's parts (built by `assembly.build_run`).

`train()` and `train_step()` know nothing of files, W&B, which data-parallel engine is behind the
`Strategy`, or which objective is behind the `Task`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lvmtrain.assembly import RunParts, build_run
from lvmtrain.checkpoint import CheckpointError, CheckpointManager
from lvmtrain.checkpoint_files import newest_verified, set_rng_state
from lvmtrain.config.loader import config_to_dict
from lvmtrain.config.schema import Config
from lvmtrain.data.batch import Batch
from lvmtrain.data.ledger import BadSampleCounter, SampleLedger
from lvmtrain.data.order import Cursor
from lvmtrain.data.transforms import ImageNormalizer
from lvmtrain.distributed.dims import Dims, all_reduce_max, all_reduce_mean, barrier, from_rank0
from lvmtrain.distributed.strategy import Strategy
from lvmtrain.evaluation import Evaluator
from lvmtrain.health.nonfinite import LossSpikes, NonfiniteSteps, describe, record_rollback
from lvmtrain.health.profiling import StepProfiler
from lvmtrain.health.watchdog import Watchdog
from lvmtrain.metrics import MetricLogger, StepTimer, due, is_headline, memory_metrics, print0
from lvmtrain.preemption import StopRequest
from lvmtrain.rundir import RunLock
from lvmtrain.tasks import Task

CONSOLE_KEYS = ("loss", "lr", "samples_per_s", "mfu")
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
    # --- the run's parts, built by `assembly.build_run` and held for the life of the run ---
    cfg: Config
    dims: Dims
    run_dir: Path
    strategy: Strategy  # the data-parallel engine: model, optimizer, schedule, mixed precision
    task: Task  # the objective: its loss over a step's micro-batches, its evaluation
    normalize: ImageNormalizer  # the loader's uint8 images -> the model's input, on the device
    train_loader: DataLoader
    evaluator: Evaluator | None  # the eval sets (eval.sets, data.val), scored at eval.every
    checkpoints: CheckpointManager
    logger: MetricLogger
    ledger: SampleLedger | None  # the keys trained per step (data.ledger)
    bad_samples: BadSampleCounter
    total_steps: int
    global_batch: int
    step_hooks: list  # called with each step's number before it runs (model schedules)
    peak_flops: float  # of this device, for MFU
    # --- progress: saved in every checkpoint (`state_dict`) ---
    step: int
    samples_seen: int
    cursor: Cursor  # the data position after the last step trained
    _resumed_rng: dict | None  # the RNG states a resumed checkpoint saved, restored as the loop starts
    # --- health and timing of this process ---
    nonfinite: NonfiniteSteps  # steps whose loss or gradient norm was not finite (health.on_nan)
    stopped_by: str | None  # the signal that stopped the run early, once saved
    watchdog: Watchdog  # health.hang_timeout_s
    profiler: StepProfiler  # health.profile_steps, SIGUSR2
    last_eval: dict[str, float]
    timer: StepTimer

    def __init__(self, parts: RunParts | Config):
        """From a run's parts, or a config to build them from (`build_run`, collective)."""
        parts = build_run(parts) if isinstance(parts, Config) else parts
        self._lock: RunLock | None = parts.lock
        for name in ("cfg", "dims", "run_dir", "strategy", "task", "normalize", "train_loader", "evaluator",
                     "checkpoints", "logger", "ledger", "bad_samples", "total_steps", "global_batch",
                     "step_hooks", "peak_flops", "step", "samples_seen", "cursor"):
            setattr(self, name, getattr(parts, name))
        self._resumed_rng = parts.rng
        health = self.cfg.health
        self.nonfinite = NonfiniteSteps(self.dims.device, health.nan_max_events, health.nan_window_steps)
        self.strategy.skip_nonfinite = health.on_nan == "skip"
        self.spikes = LossSpikes(health.spike_zscore, health.spike_window, self.dims.device) \
            if health.spike_zscore > 0 else None
        self._spike = None  # the last step's verdict
        self._calm_until = 0  # steps up to this one run at health.rollback_lr_scale x the lr
        self._inject_nan_at = health.inject_nan_at if self.dims.rank == 0 else 0
        self.stopped_by, self.last_eval = None, {}
        self.timer = StepTimer(self.dims.device)

    def train(self) -> dict[str, float]:
        """Train to `total_steps`, or until a stop signal: then save this step and return early
        with `stopped_by` set."""
        stop = StopRequest()  # NOTE: before the loader forks its workers, which ignore the signals
        health = self.cfg.health
        self.watchdog = Watchdog(health.hang_timeout_s, self.run_dir, self.dims.rank, self.dims.world)
        self.profiler = StepProfiler(health.profile_steps, health.profile_signal_steps, self.run_dir, self.dims.rank)
        try:
            try:
                self._loop(stop)
            finally:
                stop.close()
                self.profiler.close()
                # NOTE: once stopped, the handlers stay (see `requeue_exit_code`): a rank waiting
                # at the barrier below for rank 0 must not die of srun's SIGTERM.
                if not self.stopped_by:
                    stop.restore()
            with self.watchdog.allow():
                self.checkpoints.wait()
                if self.step == self.total_steps:
                    self.logger.log_checkpoint(self.checkpoints.dir / f"step_{self.step:08d}", self.step)
                self.logger.close()
                barrier()  # rank 0 has finished W&B and the checkpoint before any rank exits
        finally:
            self.watchdog.close()
        return self.last_eval

    def _loop(self, stop: StopRequest) -> None:
        batches = iter(self.train_loader)
        if self._resumed_rng is not None:  # NOTE: last, so the masks drawn next are the saving run's
            set_rng_state(self._resumed_rng)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < self.total_steps:
            for hook in self.step_hooks:
                hook(self.step + 1)
            self.profiler.before(self.step + 1)
            if self.step < self._calm_until:  # NOTE: the schedule sets every step's lr afresh: this step only
                for group in self.strategy.scheduler.optimizer.param_groups:
                    group["lr"] *= self.cfg.health.rollback_lr_scale
            lr = self.strategy.lr  # the lr this step trains with
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.cfg.train.grad_accum_steps)]
            self.timer.add("data_wait", time.perf_counter() - t0)
            step_metrics = self.train_step(micro)
            self.step += 1
            self.profiler.after(self.step)
            self.watchdog.beat(self.step)
            # NOTE: in fp16 an overflowing gradient is the loss scaler's to skip, not a bad step
            norm = None if self.cfg.train.precision == "fp16" else step_metrics["grad_norm"]
            self.nonfinite.note(self.step, step_metrics["loss"], norm, [k for b in micro for k in b.keys], self._spike)
            self.samples_seen += self.global_batch
            self.cursor = Cursor(*micro[-1].cursor)
            for batch in micro:
                self.bad_samples.update(batch)
            if self.ledger:
                self.ledger.record(self.step, micro)
            window_steps += 1
            self.logger.advance(self.step)
            if due(self.step, self.cfg.log.every, self.total_steps):
                if not self._check_nonfinite():  # NOTE: after a rollback the window's metrics are of discarded updates
                    metrics = host_values(step_metrics)  # NOTE: the loop's only read of device values
                    metrics["lr"] = lr
                    metrics.update(self._window_metrics(window_steps, time.perf_counter() - window_start))
                    self._log(metrics)
                window_start, window_steps = time.perf_counter(), 0
            self._maybe_evaluate()
            self.checkpoints.check()
            self.stopped_by = stop.poll() if self.step < self.total_steps else None
            if self.stopped_by or self.checkpoints.should_save(self.step, self.total_steps):
                self._check_nonfinite()  # NOTE: never a checkpoint of a diverged model
                with self.watchdog.allow():
                    self.checkpoints.save(self.step, self.state_dict())
            if self.stopped_by:
                print0(f"stopped by {self.stopped_by} at step {self.step} of {self.total_steps}; "
                       f"saved {self.checkpoints.dir}/step_{self.step:08d}", enabled=self.dims.is_main)
                return

    def train_step(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One optimizer step; its metrics stay on the device (reading them would wait for the
        step to finish: the loop reads them at log steps only)."""
        batches = [self._to_device(b) for b in micro_batches]
        with self.timer("fwd_bwd"):
            totals = self.task.train_step(self.strategy, batches)
        self._spike = self.spikes(totals["loss"]) if self.spikes else None
        with self.timer("optimizer"):
            grad_norm = self.strategy.step(self._spike if self.cfg.health.on_spike == "skip" else None)
            self.task.on_step_end(self.strategy)
        return {**totals, "grad_norm": grad_norm}

    def _maybe_evaluate(self) -> None:
        if self.evaluator is None or not due(self.step, self.cfg.eval.every, self.total_steps):
            return
        self._check_nonfinite()
        with self.watchdog.allow():
            self.last_eval = self.evaluator(self.strategy.unwrapped(), normalize=self.normalize,
                                            autocast=self.strategy.autocast)
        self.logger.log(self.step, self.last_eval, console_keys=tuple(k for k in self.last_eval if is_headline(k)))

    def _check_nonfinite(self) -> bool:
        """Collective (at log, eval and save points, which every rank reaches together): act on
        the steps whose loss or gradient norm was not finite since the last check, as
        health.on_nan says. Whether the run rolled back."""
        first, count, spiked = self.nonfinite.agree()
        if not first:
            self.nonfinite.reset()
            return False
        health, keys = self.cfg.health, self.nonfinite.keys_of(first)
        policy = health.on_spike if spiked else health.on_nan
        what = (f"the loss spiked at step {first} (over health.spike_zscore={health.spike_zscore:g} standard "
                f"deviations above the last {health.spike_window} steps')" if spiked
                else f"the loss or gradient norm is not finite at step {first}")
        if count > 1:
            what += f" and {count - 1} more step(s) up to {self.step}"
        latest = self.checkpoints.dir / "latest"
        kept = f"{self.checkpoints.dir}/{latest.read_text().strip()}" if latest.exists() else "none yet"
        advice = (f"(newest checkpoint: {kept}). Lower optim.lr or raise optim.warmup_steps, look at those "
                  f"samples (data.ledger=true names every step's), or train in fp32")
        if policy == "stop":
            raise TrainingDiverged(f"{what} (step {first}'s {describe(keys)}); stopped without evaluating or "
                                   f"saving {advice}")
        if self.nonfinite.too_many(self.step, [first] * (count if policy == "skip" else 1)):
            tried = "; ".join(self.nonfinite.tried) or "nothing"
            raise TrainingDiverged(
                f"{what} (step {first}'s {describe(keys)}): more than health.nan_max_events="
                f"{self.nonfinite.max_events} such steps within {self.nonfinite.window} steps (at steps "
                f"{', '.join(map(str, self.nonfinite.events))}); tried: {tried}; stopped {advice}")
        self.nonfinite.reset()
        if policy == "skip":
            self.nonfinite.tried.append(f"skipped the update of step {first}" + (f" (+{count - 1})" if count > 1 else ""))
            if self.dims.is_main:
                print(f"lvmtrain: warning: {what}: its update was skipped; step {first}'s "
                      f"{describe(keys)}", file=sys.stderr, flush=True)
            return False
        self._rollback(first, what, keys)
        return True

    def _rollback(self, first: int, what: str, keys: list[str]) -> None:
        """Reload the newest checkpoint's weights, optimizer and task state; the step count, lr
        schedule, data position and logs go on (the batches since the checkpoint are skipped)."""
        self.checkpoints.wait()
        found = from_rank0(lambda: newest_verified(self.checkpoints.dir), CheckpointError)
        if not found:
            raise TrainingDiverged(f"{what} (step {first}'s {describe(keys)}) and there is no checkpoint to roll "
                                   f"back to yet (health.on_nan=rollback); lower checkpoint.every or optim.lr")
        path = found[0]
        state = self.checkpoints.load(path, {"strategy": self.strategy.load_template()})
        state["strategy"]["scheduler"] = self.strategy.scheduler.state_dict()  # the schedule goes on
        self.strategy.load_state_dict(state["strategy"])
        self.task.load_state_dict(state.get("task", {}))
        discarded = [state["step"] + 1, self.step]
        self.nonfinite.tried.append(f"rolled back to step {state['step']} at step {self.step}")
        self._calm_until = self.step + self.cfg.health.rollback_lr_steps
        if self.dims.is_main:
            record_rollback(self.run_dir, {"step": first, "at": self.step, "checkpoint": str(path),
                                           "discarded_steps": discarded, "keys": keys})
            print(f"lvmtrain: warning: {what}: rolled back to {path}; the updates of "
                  f"steps {discarded[0]}..{discarded[1]} are discarded and their batches skipped; step {first}'s "
                  f"{describe(keys)}", file=sys.stderr, flush=True)

    def _to_device(self, batch: Batch) -> Batch:
        out = batch.to(self.dims.device, self.task.fields)
        image, out.image = out.image, self.normalize(out.image)  # a new tensor: the loader's buffer is free
        if out.views is not None:  # views[0] is the image: normalised once
            out.views = [out.image if v is image else self.normalize(v) for v in out.views]
        batch.release()
        if self.step + 1 == self._inject_nan_at:  # health.inject_nan_at: drills and tests, once
            self._inject_nan_at = 0
            out.image.fill_(float("nan"))
            for v in out.views or ():
                v.fill_(float("nan"))
        return out

    def _window_metrics(self, steps: int, elapsed: float) -> dict[str, float]:
        """Throughput, MFU, the step's time by phase, memory and data counts over the last
        `steps` steps. Per-device rates are this rank's (averaged over ranks by `_log`)."""
        per_device = steps * self.global_batch / self.dims.world / elapsed
        # NOTE: asked each window: a step hook may change what a step computes (unmasked tuning)
        flops = per_device * self.strategy.unwrapped().flops_per_sample()
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
        return {"strategy": self.strategy.state_dict(), "task": self.task.state_dict(), "step": self.step,
                "samples_seen": self.samples_seen,
                "cursor": self.cursor.state_dict(), "bad_samples": self.bad_samples.state_dict(),
                "wandb_id": self.logger.wandb_id, "config": config_to_dict(self.cfg)}
