"""Evaluation sharded across ranks: top-1 of a classifier, CLIP zero-shot top-1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lvmtrain.data.loader import release_batch
from lvmtrain.distributed.dims import all_reduce_sum


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, class_names: list[str], templates: list[str],
                      device: torch.device) -> torch.Tensor:
    """[embed_dim, classes]: each class's text embedding averaged over the prompt templates."""
    weights = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def top1(model: nn.Module, loader, device: torch.device, *, classifier: torch.Tensor | None = None,
         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
         normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Top-1 accuracy over every rank's share of the evaluation set.

    With `classifier` (zero-shot weights) images are scored against class text embeddings,
    otherwise the model's own logits are used. `normalize` turns the loader's uint8 images into
    the model's input.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        images = normalize(batch["image"].to(device, non_blocking=True))
        release_batch(batch)  # `normalize` made a new tensor: the loader may refill the buffer
        labels = batch["label"].to(device, non_blocking=True)
        with autocast():
            if classifier is not None:
                logits = F.normalize(model.encode_image(images).float(), dim=-1) @ classifier
            else:
                logits = model(images).float()
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    return {"top1": (counts[0] / counts[1].clamp(min=1)).item(), "samples": int(counts[1].item())}
