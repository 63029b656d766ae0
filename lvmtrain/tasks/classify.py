"""Image classification: cross-entropy with optional label smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ClassifyTask:
    """batch {"image", "label"} -> {"loss", "accuracy"}."""

    inputs = ("image", "label")
    batch_coupled = False  # a mean of per-sample losses: micro-batches accumulate exactly

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        logits = model(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
