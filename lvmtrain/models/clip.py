"""CLIP (Radford et al., 2021): image tower + text tower + learnable temperature.

The contrastive loss, and any gathering of features across ranks, lives in
`lvmtrain.tasks.contrastive`; this module only embeds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.models.layers import fwd_bwd_flops
from lvmtrain.models.text import TextTransformer
from lvmtrain.models.vit import VisionTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)


class CLIP(nn.Module):
    """Two towers projected into one `embed_dim` space.

    `visual` is a `VisionTransformer` in CLIP form (no patch bias, `norm_pre`, class-token pooling,
    bias-free `head` as the projection), `text` a `TextTransformer`. Names map one-to-one onto
    open_clip's `CLIP` via `lvmtrain.models.convert`.

    Args:
        embed_dim: joint embedding size.
        vision: keyword arguments of `VisionTransformer` (image_size, patch_size, width, depth,
            num_heads, mlp_ratio, drop_path_rate, patch_dropout); the CLIP-specific ones are set
            here.
        text: keyword arguments of `TextTransformer` other than `embed_dim`.
        act: "gelu" or "quick_gelu", for both towers.
        pool: the image tower's pooling: "token" (CLIP's class token) or "avg" (SigLIP's mean of
            the patch tokens, no class token).
        init_logit_scale: the log-temperature's init (CLIP: log 1/0.07; SigLIP: log 10).
        init_logit_bias: when given, a learnable logit bias with this init (SigLIP: -10), returned
            by `forward` as "logit_bias".
    """

    def __init__(self, embed_dim: int, vision: dict, text: dict, act: str = "gelu", pool: str = "token",
                 init_logit_scale: float = INIT_LOGIT_SCALE, init_logit_bias: float | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.init_logit_scale, self.init_logit_bias = init_logit_scale, init_logit_bias
        self.visual = VisionTransformer(
            **vision,
            num_classes=embed_dim,
            global_pool=pool,
            class_token=pool == "token",
            patch_bias=False,
            pre_norm=True,
            head_bias=False,
            act=act,
            norm_eps=1e-5,
            init_mode="clip",
        )
        self.text = TextTransformer(**text, embed_dim=embed_dim, act=act)
        # NOTE: the towers initialise themselves; calling `self.init_weights()` here would draw
        # every weight twice (seconds for ViT-H on CPU).
        # NOTE: shape (1,), not a 0-d scalar (open_clip's `nonscalar_logit_scale`): FSDP2 and
        # DeepSpeed's zero.Init shard along dim 0 and refuse 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), init_logit_scale))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full((1,), init_logit_bias))

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise both towers, the temperature and the bias; valid after `to_empty()` from meta."""
        self.visual.init_weights()
        self.text.init_weights()
        self.logit_scale.fill_(self.init_logit_scale)
        if self.logit_bias is not None:
            self.logit_bias.fill_(self.init_logit_bias)

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        """Text tokens per caption; the tokenizer pads or truncates to it."""
        return self.text.context_length

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale", "logit_bias"} if self.logit_bias is not None else {"logit_scale"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    def forward_features(self, images: Tensor) -> Tensor:
        """Images -> visual tokens (B, 1 + patches, width) after `visual.norm`."""
        return self.visual.forward_features(images)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        out = {
            "image_features": self.encode_image(images, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            # NOTE: a copy made inside forward: FSDP2 frees the unsharded parameter once forward
            # returns (reshard_after_forward), and the loss reads the bias after that
            out["logit_bias"] = self.logit_bias.clone()
        return out

    def flops_per_sample(self, train: bool = True) -> int:
        """Analytic training FLOPs (forward + backward) for one image-caption pair.

        The sum of both towers' counts (see `VisionTransformer.flops_per_sample` and
        `TextTransformer.flops_per_sample`: 3 x forward, forward = 2 x matmul/conv MACs, the
        projections included). The B x B logits matrix is left out: it depends on the batch.
        `train` counts the image tokens left by patch dropout; `train=False`, all of them.
        """
        return fwd_bwd_flops(self.visual.forward_macs(train) + self.text.forward_macs())
