"""The one seam between the training loop and a data-parallel engine.

The trainer only ever talks to a `Strategy`; it never asks which engine is behind it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from torch import Tensor, nn

from lvmtrain.config.schema import OptimConfig, ParallelConfig
from lvmtrain.distributed.dims import Dims


class Strategy(Protocol):
    model: nn.Module
    """The wrapped model, to call in the forward pass."""

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, total_steps: int) -> None:
        """Wrap the plain model and build its optimizer and learning-rate schedule."""

    def autocast(self) -> AbstractContextManager:
        """Mixed-precision context of the forward pass (a no-op in fp32)."""

    def micro_step(self, *, sync_grads: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward + backward (autocast; gradient sync only when
        `sync_grads`, i.e. on the last micro-batch of an accumulation)."""

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> Tensor:
        """Clip, optimizer step, schedule step, zero grads; return the pre-clip gradient norm."""

    @property
    def lr(self) -> float: ...

    def unwrapped(self) -> nn.Module:
        """The plain model, for evaluation and export."""

    def state_dict(self) -> dict:
        """Model (plain parameter names), optimizer, schedule and loss-scaler state."""

    def load_state_dict(self, state: dict) -> None: ...


def build_strategy(cfg: ParallelConfig, dims: Dims, precision: str) -> Strategy:
    if cfg.backend == "ddp":
        from lvmtrain.distributed.ddp import DDPStrategy

        return DDPStrategy(cfg, dims, precision)
    raise NotImplementedError(f"parallel.backend={cfg.backend}")
