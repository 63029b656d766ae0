"""Non-finite steps (`health.on_nan`): what is seen on the device each step, what every rank
agrees on where the loop syncs anyway, and the record of what was done about it.

Each step adds to two device tensors (the first bad step, and how many) without a host read;
`agree()` (collective, at log, eval and save points) all-reduces them once. The keys each rank
trained since the last agreement are kept on the host (a few steps' worth), so a message can name
the samples of the bad step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

BIG = torch.iinfo(torch.int64).max


class NonfiniteSteps:
    def __init__(self, device: torch.device, max_events: int, window: int):
        self.device, self.max_events, self.window = device, max_events, window
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # 0: none since the last agreement
        self.first_spike = torch.zeros((), dtype=torch.int64, device=device)  # of those, the loss spikes
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.keys: dict[int, list[str]] = {}  # this rank's keys per step since the last agreement
        self.events: list[int] = []  # steps acted on (skipped, rolled back), for the window
        self.tried: list[str] = []

    def note(self, step: int, loss: Tensor, grad_norm: Tensor | None, keys: list[str],
             spike: Tensor | None = None) -> None:
        """After each step (no host sync); `grad_norm` None: not judged (fp16, whose loss scaler
        skips overflowing steps itself); `spike`: `LossSpikes`' verdict."""
        bad = ~torch.isfinite(loss).to(self.device)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm).to(self.device))
        if spike is not None:
            self.first_spike = torch.where((self.first_spike == 0) & spike & ~bad, step, self.first_spike)
            bad = bad | spike
        self.first = torch.where((self.first == 0) & bad, step, self.first)
        self.count += bad
        self.keys[step] = keys

    def agree(self) -> tuple[int, int, bool]:
        """(The first bad step on any rank since the last call, or 0; how many steps were bad, at
        most, on one rank; whether the first was a loss spike rather than non-finite.) Collective."""
        big = lambda t: torch.where(t == 0, BIG, t)  # noqa: E731
        values = torch.stack([big(self.first), big(self.first_spike), -self.count])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
        first, spike, count = (int(v) for v in values.tolist())
        return (0 if first == BIG else first), -count, spike == first

    def keys_of(self, step: int) -> list[str]:
        """Every rank's keys of `step`, in rank order (collective)."""
        mine = self.keys.get(step, [])
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return [k for keys in every for k in keys]

    def reset(self) -> None:
        self.first.zero_()
        self.first_spike.zero_()
        self.count.zero_()
        self.keys.clear()

    def too_many(self, step: int, new: list[int]) -> bool:
        """Record `new` events; whether more than `max_events` fall within the window."""
        self.events = [s for s in self.events + new if s > step - self.window]
        return len(self.events) > self.max_events


def describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} samples: {shown}{', ...' if len(keys) > limit else ''}" if keys else "its keys are not known"


def record_rollback(run_dir: Path, entry: dict) -> None:
    """One line of RUN/ledger/rollbacks.jsonl (rank 0): the bad step, the checkpoint reloaded,
    the steps whose updates were discarded and the bad step's sample keys."""
    path = run_dir / "ledger" / "rollbacks.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


class LossSpikes:
    """`health.spike_zscore`: a step whose loss (the mean over ranks: every rank judges alike)
    lies more than z standard deviations above the mean of the last `window` losses, on the
    device. Spikes and non-finite losses stay out of the history."""

    def __init__(self, z: float, window: int, device: torch.device):
        self.z, self.window = z, window
        self.history = torch.zeros(window, device=device)
        self.seen = 0  # losses in the history (host: counted, never read from the device)

    def __call__(self, loss: Tensor) -> Tensor:
        mean_loss = loss.detach().float().clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= dist.get_world_size()
        filled = self.history[:min(self.seen, self.window)]
        if self.seen < self.window:  # NOTE: no verdict before a full window
            spike = torch.zeros((), dtype=torch.bool, device=mean_loss.device)
        else:
            spike = (mean_loss - filled.mean()) / filled.std().clamp(min=1e-8) > self.z
        # NOTE: a spike or NaN enters as the history's mean (deciding on the host would be a sync)
        neutral = filled.mean() if self.seen else torch.zeros_like(mean_loss)
        keep = ~spike & torch.isfinite(mean_loss)
        self.history[self.seen % self.window] = torch.where(keep, mean_loss, neutral)
        self.seen += 1
        return spike
