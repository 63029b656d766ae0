"""The `health` section: what a run does about hung ranks, and traces taken while it trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class HealthConfig:
    """Training health: non-finite steps, hung ranks (a watchdog per rank), on-demand profiles."""

    on_nan: Literal["stop", "skip", "rollback"] = "stop"
    """A step whose loss or gradient norm is NaN or inf (seen on the device, read where the loop
    syncs anyway): stop, without evaluating or saving; skip: drop that update (on GPUs the fused
    AdamW skips it on the device; elsewhere a host read of the norm; not under DeepSpeed);
    rollback: reload the newest checkpoint's weights, optimizer and task state and go on with the
    data after the bad step (its batches and those since the checkpoint are skipped, listed in
    RUN/ledger/rollbacks.jsonl). Both count into nan_max_events."""
    rollback_lr_scale: float = 1.0
    """rollback: the lr is multiplied by this for rollback_lr_steps steps after each rollback
    (1: unchanged)."""
    rollback_lr_steps: int = 0
    """rollback: the steps rollback_lr_scale lasts."""
    nan_max_events: int = 3
    """skip / rollback: more non-finite steps than this within nan_window_steps stop the run,
    naming the steps, their samples and what was tried."""
    nan_window_steps: int = 1000
    """skip / rollback: the window (in steps) nan_max_events counts over."""
    spike_zscore: float = 0.0
    """Loss spikes: a step whose loss (mean over ranks) is more than this many standard deviations
    above the mean of the last spike_window steps is acted on as health.on_spike says. 0: off.
    Costs one small all-reduce per step, no host sync."""
    spike_window: int = 100
    """Loss spikes: the steps whose losses the z-score is taken against (none judged before)."""
    on_spike: Literal["stop", "skip", "rollback"] = "skip"
    """Loss spikes: as health.on_nan (skip drops the spiking step's update), counted alike."""
    inject_nan_at: int = 0
    """Tests and drills: step N's images are NaN on rank 0 (once per process), so its loss and
    every rank's gradients are. 0: never."""

    hang_timeout_s: float = 900.0
    """A step that has not finished after this long (a rank stopped, dead, or stuck in a
    collective) ends the run: every rank that can writes its Python stacks and last step to
    RUN/hang/, one line on rank 0's log names the ranks that stopped answering, and the processes
    exit with code 43, which torchrun restarts and slurm/train.sbatch requeues (both resume).
    The first step, evaluation and checkpoint saves get 10x as long. 0: off."""
    profile_steps: list[int] = field(default_factory=list)
    """[start, end]: trace steps start..end with torch.profiler into RUN/traces/ (Chrome / Perfetto
    JSON, a file per rank; with a CUDA memory snapshot on GPUs). []: none."""
    profile_signal_steps: int = 3
    """Steps traced after a rank gets SIGUSR2 (`kill -USR2 PID`, `scancel --signal=USR2 JOB`),
    from the next step on, without stopping training."""
