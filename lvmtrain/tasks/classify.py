"""Image classification: cross-entropy with optional label smoothing, scored by its own head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.data.batch import Batch
from lvmtrain.tasks.base import TaskDefaults, accumulate


class ClassifyTask(TaskDefaults):
    """batch {"image", "label"} -> {"loss", "accuracy"}."""

    name = "classify"
    fields = ("label",)
    eval_kind = "classify"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> ClassifyTask:
        return cls(label_smoothing=cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch.image).float()
        loss = F.cross_entropy(logits, batch.label, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == batch.label).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    def train_step(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        # NOTE: a mean of per-sample losses: micro-batches accumulate exactly
        return accumulate(strategy, batches, self)

