"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across ranks.

Each transformer block is its own unit (its parameters are gathered just before it runs), then
each tower of a CLIP, then the root takes what is left (embeddings, norms, heads).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)

from lvmtrain.distributed.strategy import TorchStrategy, ensure_process_group, transformer_blocks
from lvmtrain.metrics import print0


class FSDPStrategy(TorchStrategy):
    def init_context(self) -> contextlib.AbstractContextManager:
        return torch.device("meta") if self.cfg.meta_init else contextlib.nullcontext()

    def wrap(self, model: nn.Module) -> nn.Module:
        offload = self.cfg.offload_optimizer or self.cfg.offload_params
        if self.dims.world == 1 and not (offload or self.cfg.meta_init):
            # NOTE: one rank has nothing to shard: fully_shard would only add copies in and out of
            # its flat buffers and a hook per unit (0.69x of the plain step on one H200). As
            # torchtitan with a data-parallel shard degree of 1, run the plain model (same
            # checkpoint layout, so the run resumes sharded on more ranks).
            print0("parallel.backend=fsdp on one rank: nothing to shard, the model runs unwrapped",
                   enabled=self.dims.is_main)
            return model.to(self.dims.device)
        ensure_process_group(self.dims)
        reduce_dtype = torch.bfloat16 if self.cfg.reduce_dtype == "bf16" else torch.float32
        kwargs = dict(
            mp_policy=MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=reduce_dtype if self.dtype else None),
            reshard_after_forward=self.cfg.reshard_after_forward,
            offload_policy=CPUOffloadPolicy(pin_memory=self.dims.device.type == "cuda") if offload else OffloadPolicy())
        if not offload:
            model.to(torch.device("meta") if self.cfg.meta_init else self.dims.device)
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        for tower in _towers(model):
            # NOTE: CLIP's towers are units of their own so that encode_image / encode_text
            # (zero-shot evaluation) gather what they need without going through the root's forward.
            fully_shard(tower, **kwargs)
        fully_shard(model, **kwargs)
        for path, method in getattr(model, "fsdp_forward_methods", ()):
            # NOTE: methods called instead of a unit's forward (evaluation's encode_image, MAE's
            # encoder on the seen patches) gather that unit's shards only when registered; a
            # method its unit's own forward calls must not be (it would reshard mid-forward)
            register_fsdp_forward_method(model.get_submodule(path), method)
        if self.cfg.meta_init:
            # NOTE: each rank initialises only its shards; the values differ from a plain build
            # with the same seed (the random streams are cut differently), not their distribution.
            model.to_empty(device="cpu" if offload else self.dims.device)
            with torch.no_grad():
                model.init_weights()
        return model

    @contextlib.contextmanager
    def micro_step(self, *, sync_grads: bool):
        if self.dims.distributed:
            self.model.set_requires_gradient_sync(sync_grads)
        with self.autocast():
            yield


def _towers(model: nn.Module) -> list[nn.Module]:
    """Direct children that hold transformer blocks (CLIP's visual and text towers)."""
    blocks = set(map(id, transformer_blocks(model)))
    return [child for child in model.children() if not isinstance(child, nn.ModuleList)
            and any(id(m) in blocks for m in child.modules())]
