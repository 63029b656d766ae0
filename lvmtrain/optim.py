"""AdamW with the usual no-decay groups, and warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lvmtrain.config.schema import OptimConfig


def param_group_names(model: nn.Module, weight_decay: float) -> list[list[str]]:
    """Names of the parameters of each group of `param_groups`, in the same order."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # NOTE: a parameter partitioned by DeepSpeed's zero.Init keeps its real shape in ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        if p.requires_grad:
            (no_decay if ndim <= 1 or name in skip else decay).append(name)
    return [decay, no_decay]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything that must not decay (norms, biases, position
    embeddings, class token, logit_scale: what the model's `no_weight_decay()` names plus all
    parameters with ndim <= 1)."""
    params = dict(model.named_parameters())
    decay, no_decay = param_group_names(model, weight_decay)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW: `fused` (one kernel for every parameter, for CUDA parameters) or foreach
    (torch's default, and the faster of the two on CPUs)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                               schedule=cfg.schedule, min_ratio=cfg.min_lr / cfg.lr))
