"""Named model presets, as plain data, and `build_model` to turn one into a module.

Shapes follow timm's `vit_*_224` registrations and open_clip's `model_configs/ViT-*.json`, so
pretrained weights from either load through `lvmtrain.models.convert`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lvmtrain.models.clip import CLIP
from lvmtrain.models.vit import VisionTransformer


@dataclass(frozen=True)
class ViTConfig:
    """A classification ViT; fields are `VisionTransformer` arguments."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    global_pool: str = "token"
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP's image tower; pooling, biases and norms are fixed by `CLIP`."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class TextConfig:
    """CLIP's text tower; fields are `TextTransformer` arguments."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: CLIPVisionConfig
    text: TextConfig
    act: str = "gelu"
    pool: str = "token"
    """The image tower's pooling: CLIP's class token, or SigLIP's mean of patch tokens ("avg", no
    class token)."""
    task: str = "clip"
    """The objective the preset is trained with by default (`train.task`)."""


def _clip(embed_dim: int, vision: tuple, text: tuple, **kwargs) -> CLIPConfig:
    image_size, patch_size, width, depth, num_heads = vision
    text_width, text_depth, text_heads = text
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=CLIPVisionConfig(image_size, patch_size, width, depth, num_heads),
        text=TextConfig(width=text_width, depth=text_depth, num_heads=text_heads),
        **kwargs,
    )


PRESETS: dict[str, ViTConfig | CLIPConfig] = {
    "vit_debug": ViTConfig(image_size=32, patch_size=4, width=128, depth=4, num_heads=4, num_classes=10),
    "vit_ti16": ViTConfig(image_size=224, patch_size=16, width=192, depth=12, num_heads=3),
    "vit_s16": ViTConfig(image_size=224, patch_size=16, width=384, depth=12, num_heads=6),
    "vit_b32": ViTConfig(image_size=224, patch_size=32, width=768, depth=12, num_heads=12),
    "vit_b16": ViTConfig(image_size=224, patch_size=16, width=768, depth=12, num_heads=12),
    "vit_l14": ViTConfig(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16),
    "vit_h14": ViTConfig(image_size=224, patch_size=14, width=1280, depth=32, num_heads=16),
    "vit_g14": ViTConfig(
        image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_ratio=48 / 11
    ),
    # open_clip sets vision heads as width // head_width (64, or 80 for ViT-H-14).
    "clip_debug": _clip(128, vision=(32, 4, 128, 4, 4), text=(128, 3, 4)),
    "clip_b32": _clip(512, vision=(224, 32, 768, 12, 12), text=(512, 12, 8)),
    "clip_b16": _clip(512, vision=(224, 16, 768, 12, 12), text=(512, 12, 8)),
    "clip_l14": _clip(768, vision=(224, 14, 1024, 24, 16), text=(768, 12, 12)),
    "clip_h14": _clip(1024, vision=(224, 14, 1280, 32, 16), text=(1024, 24, 16)),
    "clip_g14": CLIPConfig(1024, CLIPVisionConfig(224, 14, 1408, 40, 16, mlp_ratio=48 / 11),
                           TextConfig(width=1024, depth=24, num_heads=16)),
    # SigLIP (big_vision's B/16): no class token, the image pooled by the mean of its patch tokens
    # (big_vision's default is an attention-pool head), the sigmoid loss by default.
    "siglip_debug": _clip(128, vision=(32, 4, 128, 4, 4), text=(128, 3, 4), pool="avg", task="siglip"),
    "siglip_b16": _clip(768, vision=(224, 16, 768, 12, 12), text=(768, 12, 12), pool="avg", task="siglip"),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ViTConfig | CLIPConfig:
    if name not in PRESETS:
        nearest = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(f"unknown model preset {name!r}{hint} (valid: {', '.join(list_presets())})")
    return PRESETS[name]


def model_family(name: str) -> Literal["vit", "clip"]:
    return "clip" if isinstance(get_preset(name), CLIPConfig) else "vit"


def default_task(name: str) -> str:
    """The objective preset `name` trains with unless `train.task` says otherwise."""
    cfg = get_preset(name)
    return cfg.task if isinstance(cfg, CLIPConfig) else "classify"


def text_context_length(name: str, override: int | None = None) -> int | None:
    """Tokens per caption of preset `name`'s text tower (`override`: model.context_length); None
    for a ViT."""
    cfg = get_preset(name)
    return (override or cfg.text.context_length) if isinstance(cfg, CLIPConfig) else None


def _overrides(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def build_model(
    name: str,
    *,
    image_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
    global_pool: str | None = None,
    drop_path_rate: float | None = None,
    context_length: int | None = None,
    patch_dropout: float = 0.0,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> nn.Module:
    """Build preset `name`; each keyword left as None keeps the preset's value.

    `image_size` and `patch_size` resize the position table (the image size must be divisible by
    the patch size); pretrained weights then no longer load as they are.
    `context_length` (CLIP only) may only shorten the text position table; pretrained weights
    are truncated to it by `convert.load_open_clip`. `num_classes` and `global_pool` are ViT only.
    `drop_path_rate` applies to both CLIP towers, `patch_dropout` (FLIP) to the image tower.
    `init_logit_scale` / `init_logit_bias` (CLIP only: an objective's, e.g. SigLIP's) set the
    temperature's init and add a learnable logit bias.
    """
    cfg = get_preset(name)
    if isinstance(cfg, ViTConfig):
        if context_length is not None:
            raise ValueError(f"context_length applies to CLIP presets only; {name!r} is a ViT")
        overrides = _overrides(
            image_size=image_size,
            patch_size=patch_size,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_path_rate=drop_path_rate,
        )
        if init_logit_scale is not None or init_logit_bias is not None:
            raise ValueError(f"init_logit_scale / init_logit_bias apply to CLIP presets only; {name!r} is a ViT")
        return VisionTransformer(**dataclasses.asdict(dataclasses.replace(cfg, **overrides)),
                                 patch_dropout=patch_dropout)

    for key, value in (("num_classes", num_classes), ("global_pool", global_pool)):
        if value is not None:
            raise ValueError(f"{key} applies to ViT presets only; {name!r} is a CLIP")
    if context_length is not None and not 0 < context_length <= cfg.text.context_length:
        raise ValueError(
            f"context_length {context_length} for {name!r} must be in 1..{cfg.text.context_length} "
            "(the preset's position table can be shortened, not extended)"
        )
    vision = dataclasses.replace(
        cfg.vision, **_overrides(image_size=image_size, patch_size=patch_size, drop_path_rate=drop_path_rate)
    )
    text = dataclasses.replace(
        cfg.text, **_overrides(context_length=context_length, drop_path_rate=drop_path_rate)
    )
    vision_kwargs, text_kwargs = dataclasses.asdict(vision), dataclasses.asdict(text)
    logit = _overrides(init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
    return CLIP(cfg.embed_dim, vision={**vision_kwargs, "patch_dropout": patch_dropout}, text=text_kwargs, act=cfg.act,
                pool=cfg.pool, **logit)
