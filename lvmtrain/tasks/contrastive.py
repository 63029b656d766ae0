"""Image-text objectives whose loss couples the samples of a batch (each is the others' negative):
CLIP's symmetric InfoNCE, and the base SigLIP shares (the gradient cache).

InfoNCE: each rank scores its own images and texts against the whole global batch (all-gathered
with gradients, as open_clip's `gather_with_grad` + `local_loss`). The mean over ranks of these
local losses is exactly the single-process loss on the global batch, and with DDP's gradient
averaging so is the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.checkpoint_files import rng_state, set_rng_state
from lvmtrain.data.batch import Batch
from lvmtrain.tasks.base import TaskDefaults, accumulate

class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward, reduce_scatter backward (each rank's shard gets the sum of every rank's
    gradient for it), both plain synchronous c10d calls.

    NOTE: not torch's functional collectives (an AsyncCollectiveTensor waited lazily, its backward
    in flight beside DDP's all-reduces): a 2-rank CPU demo died of SIGSEGV once in CI inside that
    gather. These are the plain calls DDP and FSDP make themselves."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous())
        return out


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank, in rank order; gradients flow back to each rank's shard."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


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


class ContrastiveTask(TaskDefaults):
    """An image-text objective: `features` of a micro-batch, `loss` of features. Subclasses name
    their `scalar_keys` (the learnable temperature, a bias: shared by every sample) and `loss`.

    Accumulated micro-batches are scored together, as one batch (`train_step`); data.val is
    evaluated by zero-shot classification with the class names' text embeddings.
    """

    name = "contrastive"
    fields = ("text",)
    eval_kind = "zeroshot"
    feature_keys = ("image_features", "text_features")
    scalar_keys: tuple[str, ...] = ()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> ContrastiveTask:
        from lvmtrain.data.tokenizer import CLIPTokenizer

        return cls(CLIPTokenizer(context_length=context_length))

    def features(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        out = model(batch.image, batch.text)
        # NOTE: the similarity matrix is computed in fp32 even under autocast: bf16 logits over a
        # large global batch lose the small differences a contrastive loss learns from.
        return {k: out[k].float() for k in (*self.feature_keys, *self.scalar_keys)}

    def loss(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return self.loss(self.features(model, batch))

    def train_step(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        if len(batches) == 1:
            return accumulate(strategy, batches, self)
        return self._gradient_cache(strategy, batches)

    def _gradient_cache(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        """Accumulation with the loss of the whole accumulated batch, as if it were one micro-batch,
        at the cost of one extra forward.

        Features of every micro-batch first without gradients; the loss on all of them and its
        gradient with respect to the features; then each micro-batch again with gradients,
        back-propagating its slice of that gradient (open_clip's accum_freq; the gradient cache of
        Gao et al. 2021). The RNG is replayed so both forwards drop the same paths.
        """
        model = strategy.model
        rng, cached = [], []
        with torch.no_grad(), strategy.autocast():
            for batch in batches:
                rng.append(rng_state())
                cached.append(self.features(model, batch))
        after = rng_state()
        feats = {k: torch.cat([f[k] for f in cached]).requires_grad_() for k in self.feature_keys}
        feats.update({k: cached[0][k].detach().clone().requires_grad_() for k in self.scalar_keys})
        out = self.loss(feats)
        out["loss"].backward()
        sizes = [f[self.feature_keys[0]].shape[0] for f in cached]
        grads = {k: feats[k].grad.split(sizes) for k in self.feature_keys}
        for i, batch in enumerate(batches):
            set_rng_state(rng[i])
            with strategy.micro_step(sync_grads=i == len(batches) - 1):
                f = self.features(model, batch)
                surrogate = sum((f[k] * grads[k][i]).sum() for k in self.feature_keys)
                # NOTE: the shared scalars' gradient once, on the synchronised micro-batch: DDP
                # requires every parameter to take part in the backward that reduces gradients
                if i == len(batches) - 1:
                    surrogate = surrogate + sum((f[k] * feats[k].grad).sum() for k in self.scalar_keys)
                strategy.backward(surrogate)
        set_rng_state(after)
        return {k: v.detach() for k, v in out.items()}



class ClipTask(ContrastiveTask):
    """CLIP's symmetric InfoNCE: batch {"image", "text"} -> {"loss", "logit_scale", ...}."""

    name = "clip"
    scalar_keys = ("logit_scale",)

    def loss(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        image_to_text, text_to_image = clip_loss_terms(features["image_features"], features["text_features"],
                                                       features["logit_scale"])
        return {"loss": (image_to_text + text_to_image) / 2, "loss/image_to_text": image_to_text.detach(),
                "loss/text_to_image": text_to_image.detach(),
                "logit_scale": features["logit_scale"].detach().reshape(())}
