"""CLIP's symmetric InfoNCE loss, with features gathered across ranks.

Each rank scores its own images and texts against the whole global batch (all-gathered with
gradients, as open_clip's `gather_with_grad` + `local_loss`). The mean over ranks of these local
losses is exactly the single-process loss on the global batch, and with DDP's gradient averaging
so is the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import _functional_collectives as fc

# NOTE: torch >= 2.11 names it *_single_*; the older name is kept for torch 2.6-2.10.
_all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank, in rank order; gradients flow back to each rank's shard."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _all_gather_autograd(x.contiguous(), 0, dist.group.WORLD)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """The symmetric InfoNCE loss: the mean of `clip_loss_terms`."""
    image_to_text, text_to_image = clip_loss_terms(image_features, text_features, logit_scale)
    return (image_to_text + text_to_image) / 2


def clip_loss_terms(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(image -> text, text -> image) cross-entropies of this rank's samples against the global batch."""
    all_images = gather_with_grad(image_features)
    all_texts = gather_with_grad(text_features)
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = image_features.shape[0]
    labels = torch.arange(rank * n, (rank + 1) * n, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return F.cross_entropy(logits_per_image, labels), F.cross_entropy(logits_per_text, labels)


class ContrastiveTask:
    """batch {"image", "text"} -> {"loss", "logit_scale"}.

    The loss couples the samples of a batch (each is the others' negative), so accumulated
    micro-batches are scored together: the trainer calls `features` per micro-batch and `loss`
    once on their concatenation (see `Trainer._coupled_step`).
    """

    inputs = ("image", "text")
    batch_coupled = True
    feature_keys = ("image_features", "text_features")

    def features(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        out = model(batch["image"], batch["text"])
        # NOTE: the similarity matrix is computed in fp32 even under autocast: bf16 logits over a
        # large global batch lose the small differences InfoNCE learns from.
        return {"image_features": out["image_features"].float(), "text_features": out["text_features"].float(),
                "logit_scale": out["logit_scale"].float()}

    def loss(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        image_to_text, text_to_image = clip_loss_terms(features["image_features"], features["text_features"],
                                                       features["logit_scale"])
        return {"loss": (image_to_text + text_to_image) / 2, "loss/image_to_text": image_to_text.detach(),
                "loss/text_to_image": text_to_image.detach(),
                "logit_scale": features["logit_scale"].detach().reshape(())}

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return self.loss(self.features(model, batch))
