"""`model.init_from`: start a ViT from weights trained elsewhere: an lvmtrain run or checkpoint (its
backbone: a classifier's ViT, MAE's encoder, DINO's student), our safetensors export, or timm's
weights (a `model.safetensors` file, or a folder holding one, such as `ckpt export --format timm`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lvmtrain.config.schema import ConfigError

PREFIXES = ("encoder.", "student.backbone.")  # where wrapped backbones lie in our exports


def read_backbone(source: str) -> dict:
    """{name: tensor} of the plain ViT in `source`, in our (= timm's) names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lvmtrain.export import backbone_prefix, iter_weights, resolve

    path = Path(source)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "lvmtrain_config" in meta and meta.get("names") == "safetensors":  # our export of a whole run's model
            prefix = backbone_prefix(json.loads(meta["lvmtrain_config"]))
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return state
    if path.is_dir():
        import torch

        from lvmtrain.checkpoint_files import STATE

        ckpt, _ = resolve(source)
        config = torch.load(ckpt / STATE, map_location="cpu", weights_only=True).get("config", {})
        return dict(iter_weights(ckpt, backbone_prefix(config)))
    raise ConfigError(f"model.init_from: {source}: neither a run or checkpoint directory, a .safetensors file, "
                      f"nor a folder holding model.safetensors")


def init_backbone(model: nn.Module, source: str) -> str:
    """Load `source`'s ViT into `model` (a plain ViT); a head it lacks keeps its own init (a
    classifier fine-tuned from a self-supervised backbone). Returns a one-line summary."""
    state = read_backbone(source)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.startswith("head."))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        what = (f"lacks {missing[:4]}" if missing else "") + (" and " if missing and wrong else "") + \
            (f"has other shapes for {[(k, tuple(state[k].shape)) for k in wrong[:3]]}" if wrong else "")
        raise ConfigError(f"model.init_from: {source} {what} (model.name, image_size, patch_size and global_pool "
                          f"must describe the same ViT)")
    kept = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(kept, strict=False)
    return f"model.init_from: {len(kept)} tensors from {source}" + (
        " (head left at its init)" if any(k.startswith("head.") and k not in state for k in expected) else "")
