"""On-demand traces while training runs: `health.profile_steps: [start, end]`, or SIGUSR2 to a
rank (the next `health.profile_signal_steps` steps). torch.profiler writes a Chrome / Perfetto
trace per rank into RUN/traces/; on GPUs a CUDA memory snapshot (open it at
pytorch.org/memory_viz) goes beside it. Nothing stops or waits on other ranks."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

PROFILE_SIGNAL = signal.SIGUSR2


class StepProfiler:
    """`before(step)` ahead of each step, `after(step)` once it is done, `close()` at the end."""

    def __init__(self, steps: list[int], signal_steps: int, run_dir: Path, rank: int):
        self.window = tuple(steps) if steps else None
        self.signal_steps, self.rank = signal_steps, rank
        self.dir = Path(run_dir) / "traces"
        self.requested = False
        self.active: tuple[int, int] | None = None
        self._prof = self._mark = None
        self._previous = signal.signal(PROFILE_SIGNAL, self._note)

    def _note(self, signum, frame) -> None:  # a signal handler only notes: the loop starts it
        self.requested = True

    def before(self, step: int) -> None:
        if self._prof is None:
            if self.window and step == self.window[0]:
                self._start(step, self.window[1])
            elif self.requested:
                self.requested = False
                self._start(step, step + self.signal_steps - 1)
        if self._prof is not None:  # each step a named range of the trace
            self._mark = torch.profiler.record_function(f"lvmtrain step {step}")
            self._mark.__enter__()

    def after(self, step: int) -> None:
        if self._prof is not None:
            self._mark.__exit__(None, None, None)
            if step >= self.active[1]:
                self._stop()

    def close(self) -> None:
        if self._prof is not None:  # the run ended inside the window: keep what was traced
            self._stop()
        signal.signal(PROFILE_SIGNAL, self._previous)

    def _start(self, first: int, last: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.active = (first, last)
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self._prof.start()

    def _stop(self) -> None:
        first, last = self.active
        self._prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"steps{first:08d}-{last:08d}_rank{self.rank:05d}"
        self._prof.export_chrome_trace(f"{stem}.json")
        if torch.cuda.is_available():
            torch.cuda.memory._dump_snapshot(f"{stem}_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        self._prof, self.active = None, None
