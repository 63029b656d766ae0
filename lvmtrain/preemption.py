"""Pre-emption and time limits: a signal asks the run to save a checkpoint within a step and stop.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@120`, forwarded to the ranks by
`slurm/train.sbatch`) and sends SIGTERM on `scancel` or pre-emption; torchrun forwards the
signals named in `--signals-to-handle`. Each rank only notes the signal: the ranks then agree on
the step to stop at, every rank saves that step's checkpoint, and the process exits with
`EXIT_REQUEUE`, which the batch script answers with `scontrol requeue`.

The agreement costs the loop nothing: each step starts an all-reduce of one integer on a host
(gloo) group and reads the one it started a step earlier, long finished by then. No device sync,
no blocking collective; every rank reads the same value at the same step, so all stop together,
one step after the signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

# "Checkpoint saved on a stop signal; run me again to resume." Distinct from Python's 1 (error),
# argparse / lvmtrain's 2 (bad input) and 128+N (killed by signal N).
EXIT_REQUEUE = 42
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Notes SIGUSR1 / SIGTERM instead of dying; `poll()` turns the note into a collective decision.

    Build it on every rank at the same point (it creates a process group when distributed)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: int = 0
        self._previous: dict[int, object] = {}
        # NOTE: a group of its own on gloo whatever the training backend: a CPU tensor (no CUDA
        # sync to read it) and an op in flight that never meets the loop's own collectives.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._pending: tuple[torch.Tensor, object] | None = None
        # NOTE: handlers can only be installed from the main thread (a Trainer built elsewhere,
        # e.g. in a notebook thread, simply is not stoppable by signal).
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame) -> None:
        if not self.received:
            print(f"lvmtrain: rank {os.environ.get('RANK', '0')} got {signal.Signals(signum).name}: "
                  f"saving a checkpoint after this step, then stopping", file=sys.stderr, flush=True)
        self.received = self.received or signum

    def poll(self) -> str | None:
        """Collective, once per step on every rank: the name of a signal that some rank had noted
        by the previous call (so the same answer at the same step everywhere), else None."""
        if self._group is None:
            return signal.Signals(self.received).name if self.received else None
        agreed = self._wait()
        note = torch.tensor([self.received], dtype=torch.int32)
        self._pending = note, dist.all_reduce(note, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return signal.Signals(agreed).name if agreed else None

    def _wait(self) -> int:
        if self._pending is None:
            return 0
        note, work = self._pending
        work.wait()
        self._pending = None
        return int(note.item())

    def close(self) -> None:
        """Wait for the agreement in flight (every rank started it), before the group goes."""
        self._wait()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_exit_code() -> int:
    """`EXIT_REQUEUE`, for a process whose run stopped and saved; from here on it ignores the
    stop signals. NOTE: `srun --kill-on-bad-exit` SIGTERMs the other ranks as soon as the first
    exits 42, and Python's finalisation restores the default action of signals with Python
    handlers, so a rank still tearing down would die of the signal (exit 143, no requeue)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return EXIT_REQUEUE


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: Slurm signals every process of a job, data workers included.

    A worker dying of SIGTERM makes the trainer raise before it can save, so workers ignore
    SIGUSR1, and SIGTERM unless it comes from their own trainer process: the loader terminates a
    stuck worker that way when it shuts down (torch's workers make the same check in C).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    # NOTE: a Python handler cannot see the sender; sigwaitinfo can. SIGTERM is blocked in this
    # thread (new threads inherit the mask) and taken by a watcher thread instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="lvmtrain-sigterm", daemon=True).start()


def restart_count() -> int:
    """How many times this launch restarted: torchrun's elastic restarts or Slurm's requeues."""
    return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
               int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
