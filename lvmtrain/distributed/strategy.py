"""The one seam between the training loop and a data-parallel engine.

The trainer only ever talks to a `Strategy`; it never asks which engine is behind it.

Every strategy's `state_dict()` has the same layout, keyed by the plain model's parameter names,
so a state saved under one engine loads under any other:
    {"sharded": {"model": {name: tensor},
                 "optim": {name: {"step", "exp_avg", "exp_avg_sq"}}},
     "optimizer": {"param_groups": [{"params": [names], "lr", "weight_decay", ...}]},
     "scheduler": LambdaLR state, "scaler": GradScaler state}
("optim" and "param_groups" are `torch.distributed.checkpoint.state_dict`'s optimizer state dict's
"state" and "param_groups"). The tensors under "sharded" (`checkpoint_files.SHARDED`) are as the
engine holds them: DTensor shards under FSDP2, whole tensors under DDP, `FlatSlice`s (the ranges of
each flattened parameter its partitions hold) under ZeRO; torch.distributed.checkpoint saves and
reshards any of them into any other.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lvmtrain.checkpoint_files import SHARDED
from lvmtrain.config.schema import ConfigError, OptimConfig, ParallelConfig
from lvmtrain.distributed.dims import Dims
from lvmtrain.optim import build_optimizer, build_scheduler

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy(Protocol):
    model: nn.Module
    """The wrapped model, to call in the forward pass."""
    dims: Dims
    """This rank's place (rank, world, device)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The learning-rate schedule; its optimizer's param groups hold the lr the next step uses."""

    def init_context(self) -> AbstractContextManager:
        """Context to build the plain model in (the meta device or `zero.Init` with
        parallel.meta_init; otherwise a no-op)."""

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, total_steps: int, *, micro_batch: int,
              accum: int) -> None:
        """Compile and wrap the plain model; build its optimizer and learning-rate schedule."""

    def autocast(self) -> AbstractContextManager:
        """Mixed-precision context of the forward pass (a no-op in fp32)."""

    def micro_step(self, *, sync_grads: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward + backward (autocast; gradient sync only when
        `sync_grads`, i.e. on the last micro-batch of an accumulation)."""

    def backward(self, loss: Tensor) -> None:
        """Backward of a loss already divided by the number of micro-batches."""

    def step(self, veto: Tensor | None = None) -> Tensor:
        """Clip, optimizer step (dropped where `veto`, a device bool, is true), schedule step, zero
        grads; return the pre-clip gradient norm."""

    @property
    def lr(self) -> float: ...

    def unwrapped(self) -> nn.Module:
        """The plain model, for evaluation (its forward is collective under sharding backends:
        every rank calls it the same number of times)."""

    def state_dict(self) -> dict:
        """The layout in this module's docstring; collective."""

    def load_template(self) -> dict:
        """A `state_dict()` to read a checkpoint into: this run's shapes and placements."""

    def load_state_dict(self, state: dict) -> None: ...


def build_strategy(cfg: ParallelConfig, dims: Dims, precision: str) -> Strategy:
    if cfg.backend == "ddp":
        from lvmtrain.distributed.ddp import DDPStrategy

        return DDPStrategy(cfg, dims, precision)
    if cfg.backend == "fsdp":
        from lvmtrain.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dims, precision)
    if cfg.backend == "deepspeed":
        try:
            from lvmtrain.distributed.deepspeed_zero import DeepSpeedStrategy
        except ImportError as e:
            if "deepspeed" not in str(e):
                raise
            raise ConfigError("parallel.backend=deepspeed: DeepSpeed is not installed; "
                              "`pip install 'lvmtrain[deepspeed]'` (or choose parallel.backend=fsdp)") from None
        return DeepSpeedStrategy(cfg, dims, precision)
    raise ConfigError(f"parallel.backend: unknown backend '{cfg.backend}'")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every element of every `blocks` ModuleList (the ViT's, and CLIP's two towers'): the units
    of sharding, compilation and activation checkpointing."""
    return [blk for name, mod in model.named_modules() if name.split(".")[-1] == "blocks"
            and isinstance(mod, nn.ModuleList) for blk in mod]


def compile_model(model: nn.Module, mode: str) -> None:
    """torch.compile in place: each transformer block, or the whole model."""
    if mode == "blocks":
        for block in transformer_blocks(model):
            block.compile()
    elif mode == "model":
        model.compile()


def ensure_process_group(dims: Dims) -> None:
    """Sharding engines need a process group even for one process (torchrun or not)."""
    if not dist.is_initialized():
        backend = "nccl" if dims.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class TorchStrategy:
    """What DDP and FSDP2 share: torch's AdamW + LambdaLR, autocast, GradScaler for fp16, clipping.
    Subclasses implement `wrap` and `micro_step`."""

    def __init__(self, cfg: ParallelConfig, dims: Dims, precision: str):
        self.cfg = cfg
        self.dims = dims
        self.precision = precision
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(dims.device.type, enabled=precision == "fp16")
        self.grad_clip = 0.0
        self.skip_nonfinite = False  # health.on_nan=skip: a step with a non-finite gradient norm changes nothing

    @property
    def fused_optimizer(self) -> bool:
        """AdamW's fused kernel where the parameters live on the GPU (not with CPU offload)."""
        return self.dims.device.type == "cuda" and not (self.cfg.offload_optimizer or self.cfg.offload_params)

    def init_context(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call in forward; `model` itself stays the plain module (`self.plain`)."""
        raise NotImplementedError

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, total_steps: int, *, micro_batch: int = 0,
              accum: int = 1) -> None:
        compile_model(model, self.cfg.compile)
        self.plain = model
        self.model = self.wrap(model)
        self.optimizer = build_optimizer(self.plain, optim_cfg, fused=self.fused_optimizer)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self.grad_clip = optim_cfg.grad_clip

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, veto: Tensor | None = None) -> Tensor:
        """Clip, step, schedule; the update is dropped when `veto` (a device bool: a loss spike)
        is true, or with `skip_nonfinite` when the gradient norm is not finite."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.plain.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if (self.skip_nonfinite or veto is not None) and not self.scaler.is_enabled():
            self._step_if_finite(grad_norm, veto)
        else:  # NOTE: fp16's scaler already skips steps whose gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _step_if_finite(self, grad_norm: Tensor, veto: Tensor | None) -> None:
        """The optimizer step, dropped when the (all-reduced, so every rank's alike) norm is not
        finite or `veto` (alike on every rank) is true."""
        bad = ~torch.isfinite(grad_norm)
        if veto is not None:
            bad = bad | veto.to(bad.device)
        if self.fused_optimizer:  # the fused kernel reads found_inf on the device: no host sync
            self.optimizer.found_inf, self.optimizer.grad_scale = bad.float(), None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not bad.item():  # NOTE: a host read of the norm (free on CPU, a sync on a GPU)
            self.optimizer.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def unwrapped(self) -> nn.Module:
        return self.plain

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        # NOTE: DTensor shards under FSDP2 (each rank saves its own), the tensors themselves under
        # DDP (saved once): no gathering, no copy.
        optimizer = get_optimizer_state_dict(self.plain, self.optimizer)
        return {SHARDED: {"model": get_model_state_dict(self.plain), "optim": optimizer["state"]},
                "optimizer": {"param_groups": optimizer["param_groups"]},
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_template(self) -> dict:
        return self.state_dict()  # the live tensors: DCP reads into them in place

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.plain, state[SHARDED]["model"])
        set_optimizer_state_dict(self.plain, self.optimizer,
                                 {"state": state[SHARDED]["optim"], "param_groups": state["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
