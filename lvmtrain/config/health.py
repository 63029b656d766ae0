"""The `health` section: what a run does about hung ranks, and traces taken while it trains."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HealthConfig:
    """Training health: hung ranks (a watchdog per rank) and on-demand profiles."""

    hang_timeout_s: float = 900.0
    """A step that has not finished after this long (a rank stopped, dead, or stuck in a
    collective) ends the run: every rank that can writes its Python stacks and last step to
    RUN/hang/, one line on rank 0's log names the ranks that stopped answering, and the processes
    exit with code 43, which torchrun restarts and slurm/train.sbatch requeues (both resume).
    Evaluation and checkpoint saves get 10x as long. 0: off."""
    profile_steps: list[int] = field(default_factory=list)
    """[start, end]: trace steps start..end with torch.profiler into RUN/traces/ (Chrome / Perfetto
    JSON, a file per rank; with a CUDA memory snapshot on GPUs). []: none."""
    profile_signal_steps: int = 3
    """Steps traced after a rank gets SIGUSR2 (`kill -USR2 PID`, `scancel --signal=USR2 JOB`),
    from the next step on, without stopping training."""
