"""Models: plain `nn.Module`s that know nothing of torch.distributed."""

from lvmtrain.models.clip import CLIP
from lvmtrain.models.convert import (
    load_open_clip,
    load_timm,
    lvm_to_open_clip,
    lvm_to_timm,
    open_clip_to_lvm,
    timm_to_lvm,
)
from lvmtrain.models.registry import (
    PRESETS,
    CLIPConfig,
    CLIPVisionConfig,
    TextConfig,
    ViTConfig,
    build_model,
    get_preset,
    list_presets,
    model_family,
)
from lvmtrain.models.text import TextTransformer
from lvmtrain.models.vit import VisionTransformer

__all__ = [
    "CLIP",
    "PRESETS",
    "CLIPConfig",
    "CLIPVisionConfig",
    "TextConfig",
    "TextTransformer",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "get_preset",
    "list_presets",
    "load_open_clip",
    "load_timm",
    "lvm_to_open_clip",
    "lvm_to_timm",
    "model_family",
    "open_clip_to_lvm",
    "timm_to_lvm",
]
