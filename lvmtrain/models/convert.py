"""Move weights between lvmtrain and timm / open_clip state dicts, both ways.

`VisionTransformer` uses timm's names, so the timm conversions only check that every key is one
this model has. `CLIP` keeps timm-style names inside both towers; the table below maps each
open_clip key to exactly one of ours, with the reshapes where the layouts differ:

- `visual.class_embedding` (W,) and the position tables (L, W) gain leading 1-dims;
- `visual.proj` and `text_projection` are used by open_clip as `x @ P` (in, out), ours are
  `nn.Linear` weights (out, in): transposed;
- open_clip's causal `attn_mask` is a non-persistent buffer; ours is `is_causal=True` in SDPA.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor, nn

_TIMM_VIT_KEY = re.compile(
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm_pre|norm|fc_norm|head)\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))"
)

Reshape = Callable[[Tensor], Tensor]


def _same(t: Tensor) -> Tensor:
    return t


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _add_batch_dim(t: Tensor) -> Tensor:
    return t.unsqueeze(0)


def _drop_batch_dim(t: Tensor) -> Tensor:
    return t.squeeze(0)


def _token_to_lvm(t: Tensor) -> Tensor:
    return t.reshape(1, 1, -1)


def _token_to_open_clip(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _scale_to_lvm(t: Tensor) -> Tensor:
    # NOTE: open_clip stores a 0-d scalar, or shape (1,) with `nonscalar_logit_scale`: ours is (1,).
    return t.reshape(1)


def _scale_to_open_clip(t: Tensor) -> Tensor:
    return t.reshape(())


_BLOCK = [
    ("ln_1.{p}", "norm1.{p}"),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.{p}", "attn.proj.{p}"),
    ("ln_2.{p}", "norm2.{p}"),
    ("mlp.c_fc.{p}", "mlp.fc1.{p}"),
    ("mlp.c_proj.{p}", "mlp.fc2.{p}"),
]

# (open_clip name, lvmtrain name, open_clip -> lvmtrain, lvmtrain -> open_clip)
_CLIP_RULES: list[tuple[str, str, Reshape, Reshape]] = [
    ("visual.conv1.weight", "visual.patch_embed.proj.weight", _same, _same),
    ("visual.class_embedding", "visual.cls_token", _token_to_lvm, _token_to_open_clip),
    ("visual.positional_embedding", "visual.pos_embed", _add_batch_dim, _drop_batch_dim),
    ("visual.ln_pre.{p}", "visual.norm_pre.{p}", _same, _same),
    ("visual.ln_post.{p}", "visual.norm.{p}", _same, _same),
    ("visual.proj", "visual.head.weight", _transpose, _transpose),
    ("token_embedding.weight", "text.token_embedding.weight", _same, _same),
    ("positional_embedding", "text.pos_embed", _add_batch_dim, _drop_batch_dim),
    ("ln_final.{p}", "text.norm.{p}", _same, _same),
    ("text_projection", "text.proj.weight", _transpose, _transpose),
    ("logit_scale", "logit_scale", _scale_to_lvm, _scale_to_open_clip),
    # NOTE: SigLIP's learnable bias; open_clip keeps it as the temperature (a 0-d or (1,) tensor)
    ("logit_bias", "logit_bias", _scale_to_lvm, _scale_to_open_clip),
]
for _oc_tower, _lvm_tower in (("visual.transformer.resblocks.{i}.", "visual.blocks.{i}."),
                              ("transformer.resblocks.{i}.", "text.blocks.{i}.")):
    _CLIP_RULES += [(_oc_tower + oc, _lvm_tower + lvm, _same, _same) for oc, lvm in _BLOCK]

_OPEN_CLIP_BUFFERS = re.compile(r"(.*\.)?attn_mask")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_TO_LVM = [(_compile(oc), lvm, fwd) for oc, lvm, fwd, _ in _CLIP_RULES]
_TO_OPEN_CLIP = [(_compile(lvm), oc, bwd) for oc, lvm, _, bwd in _CLIP_RULES]


def _rename(
    state_dict: Mapping[str, Tensor], rules: list[tuple[re.Pattern, str, Reshape]], source: str, target: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if source == "open_clip" and _OPEN_CLIP_BUFFERS.fullmatch(key):
            continue
        for pattern, template, reshape in rules:
            match = pattern.fullmatch(key)
            if match:
                out[template.format(**match.groupdict())] = reshape(tensor)
                break
        else:
            raise KeyError(
                f"{source} key {key!r} has no {target} counterpart; only the standard ViT CLIP "
                "(learned positions, class-token pooling, argmax text pooling, linear projections) "
                "converts"
            )
    return out


def open_clip_to_lvm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip `CLIP` state dict -> lvmtrain `CLIP` state dict (attn_mask buffers dropped)."""
    return _rename(state_dict, _TO_LVM, "open_clip", "lvmtrain")


def lvm_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """lvmtrain `CLIP` state dict -> open_clip `CLIP` state dict (loads with strict=True)."""
    return _rename(state_dict, _TO_OPEN_CLIP, "lvmtrain", "open_clip")


def _check_timm_keys(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    for key in state_dict:
        if not _TIMM_VIT_KEY.fullmatch(key):
            raise KeyError(
                f"{source} key {key!r} is not part of the plain ViT both sides share (no register "
                "tokens, layer scale, attention pooling or pre-logits layer)"
            )
    return dict(state_dict)


def timm_to_lvm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm `VisionTransformer` state dict -> ours: the names are the same, so only checked."""
    return _check_timm_keys(state_dict, "timm")


def lvm_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our `VisionTransformer` state dict -> timm's: the names are the same, so only checked."""
    return _check_timm_keys(state_dict, "lvmtrain")


def _check_complete(model: nn.Module, state_dict: Mapping[str, Tensor], source: str, to_source) -> None:
    # NOTE: strict loading would name our keys only; naming the checkpoint's key too saves a
    # trip through the mapping table when a checkpoint is incomplete.
    expected = model.state_dict().keys()
    missing = sorted(expected - state_dict.keys())
    if missing:
        named = ", ".join(f"{k!r} ({source}: {to_source(k)!r})" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KeyError(f"{source} state dict lacks {len(missing)} key(s) the model needs: {named}{more}")
    unexpected = sorted(state_dict.keys() - expected)
    if unexpected:
        names = ", ".join(map(repr, unexpected[:5]))
        raise KeyError(f"{source} state dict has key(s) the model lacks: {names}")


def _open_clip_name(key: str) -> str:
    try:
        return next(iter(lvm_to_open_clip({key: Tensor()})))
    except KeyError:
        return "?"


def load_timm(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a timm ViT state dict into `model`; a missing or extra key raises `KeyError`, named."""
    converted = timm_to_lvm(state_dict)
    _check_complete(model, converted, "timm", lambda k: k)
    model.load_state_dict(converted, strict=True)


def load_open_clip(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an open_clip CLIP state dict into `model`; a missing or extra key raises `KeyError`.

    A text position table longer than the model's (built with a shorter `context_length`) is
    truncated, the way open_clip itself slices positions for shorter sequences.
    """
    converted = open_clip_to_lvm(state_dict)
    pos = converted.get("text.pos_embed")
    context_length = model.text.context_length
    if pos is not None and pos.shape[1] > context_length:
        converted["text.pos_embed"] = pos[:, :context_length].contiguous()
    _check_complete(model, converted, "open_clip", _open_clip_name)
    model.load_state_dict(converted, strict=True)


# NOTE: timm builds a `local-dir:` export by calling a registered model function with the saved
# `model_args` on top of its own, so any plain-ViT name would do; the nearest one names the shape.
TIMM_ARCHITECTURES = {
    "vit_debug": "vit_tiny_patch16_224",
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_l14": "vit_large_patch14_224",
    "vit_h14": "vit_huge_patch14_224",
    "vit_g14": "vit_giant_patch14_224",
}


def timm_model_args(cfg) -> dict:
    """timm `VisionTransformer` keyword arguments building the ViT of `cfg` (a resolved
    `registry.ViTConfig`): our defaults (qkv bias, patch bias, LayerNorm eps 1e-6, no pre-norm,
    fc_norm exactly when pooling by the mean) are timm's."""
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.width, "depth": cfg.depth,
            "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "num_classes": cfg.num_classes,
            "global_pool": cfg.global_pool, "class_token": True}


def open_clip_model_cfg(cfg, logit_bias: float | None = None) -> dict:
    """open_clip's `model_cfg` (`CLIP(**model_cfg)`) of the CLIP of `cfg` (a resolved
    `registry.CLIPConfig`); `logit_bias`: the SigLIP bias, when the model has one.

    Raises ValueError for what open_clip's own towers cannot compute: a vision tower without the
    class token (SigLIP's mean pooling): open_clip's `VisionTransformer` always prepends one, and
    every patch attends to it, so no setting gives the same features.
    """
    if cfg.pool != "token":
        raise ValueError(
            f"the image tower pools by {cfg.pool!r} without a class token; open_clip's VisionTransformer "
            "always has a class token that every patch attends to (pool_type='avg' averages the patches "
            "but keeps it), so no open_clip config computes this model's image features")
    vision, text = cfg.vision, cfg.text
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.act == "quick_gelu",
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                       "layers": vision.depth, "head_width": vision.width // vision.num_heads,
                       "mlp_ratio": vision.mlp_ratio},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.num_heads, "layers": text.depth, "mlp_ratio": text.mlp_ratio},
    }
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = logit_bias
    return model_cfg
