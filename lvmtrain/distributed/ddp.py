"""DDP (or the bare model when there is one process): every rank holds the whole model."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lvmtrain.config.schema import OptimConfig, ParallelConfig
from lvmtrain.distributed.dims import Dims
from lvmtrain.optim import build_optimizer, build_scheduler

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DDPStrategy:
    def __init__(self, cfg: ParallelConfig, dims: Dims, precision: str):
        self.cfg = cfg
        self.dims = dims
        self.precision = precision
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(dims.device.type, enabled=precision == "fp16")
        self.grad_clip = 0.0

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, total_steps: int) -> None:
        self.plain = model.to(self.dims.device)
        self.model = self.plain
        if self.dims.distributed:
            self.model = DistributedDataParallel(
                self.plain, device_ids=[self.dims.device.index] if self.dims.device.type == "cuda" else None,
                bucket_cap_mb=self.cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(self.plain, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self.grad_clip = optim_cfg.grad_clip

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def micro_step(self, *, sync_grads: bool):
        sync = contextlib.nullcontext() if sync_grads or not self.dims.distributed else self.model.no_sync()
        with sync, self.autocast():
            yield

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> Tensor:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.plain.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def unwrapped(self) -> nn.Module:
        return self.plain

    def state_dict(self) -> dict:
        return {"model": self.plain.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
