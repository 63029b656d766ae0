"""DDP (or the bare model when there is one process): every rank holds the whole model."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lvmtrain.distributed.strategy import TorchStrategy


class DDPStrategy(TorchStrategy):
    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.dims.device)
        if not self.dims.distributed:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.dims.device.index] if self.dims.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_mb, gradient_as_bucket_view=True,
            static_graph=self.cfg.ddp_static_graph)

    @contextlib.contextmanager
    def micro_step(self, *, sync_grads: bool):
        sync = contextlib.nullcontext() if sync_grads or not self.dims.distributed else self.model.no_sync()
        with sync, self.autocast():
            yield
