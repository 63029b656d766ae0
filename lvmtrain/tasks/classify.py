"""Image classification: cross-entropy with optional label smoothing, scored by top-1."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.data.batch import Batch
from lvmtrain.evaluate import top1
from lvmtrain.tasks.base import accumulate


class ClassifyTask:
    """batch {"image", "label"} -> {"loss", "accuracy"}."""

    name = "classify"
    fields = ("label",)
    tokenizer = None

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> ClassifyTask:
        return cls(label_smoothing=cfg.optim.label_smoothing)

    def model_args(self) -> dict:
        return {}

    def eval_classes(self, model: nn.Module) -> tuple[int, str]:
        """(classes scored in evaluation, the config key that sets them)."""
        return model.num_classes, "model.num_classes"

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch.image).float()
        loss = F.cross_entropy(logits, batch.label, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == batch.label).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    def train_step(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        # NOTE: a mean of per-sample losses: micro-batches accumulate exactly
        return accumulate(strategy, batches, self)

    def evaluate(self, model: nn.Module, loader, strategy, normalize) -> dict[str, float]:
        result = top1(model, loader, strategy.dims.device, autocast=strategy.autocast, normalize=normalize)
        return {"eval/top1": result["top1"], "eval/samples": result["samples"]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
