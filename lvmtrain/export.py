"""`lvmtrain ckpt inspect | export`: read a checkpoint without training code, write usable weights.

A checkpoint holds full tensors by the plain model's names whatever the backend that wrote it
(see `distributed/strategy.py`), so an export is a rename at most. The state file is memory-mapped:
tensors are read from disk as they are written out, and peak memory stays far below the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lvmtrain.checkpoint import STATE, CheckpointError, verify

FORMATS = ("safetensors", "open_clip", "timm")


def resolve(path: str) -> Path:
    """A checkpoint directory, or a run directory (-> its newest verified checkpoint)."""
    p = Path(path)
    if (p / STATE).exists() or (p / "manifest.json").exists():
        return p
    ckpts = sorted((p / "checkpoints").glob("step_????????"), reverse=True)
    for c in ckpts:
        try:
            verify(c)
            return c
        except CheckpointError:
            continue
    raise CheckpointError(f"{path}: neither a checkpoint (no {STATE}) nor a run with a complete checkpoint")


def load_weights(ckpt: Path) -> tuple[dict, dict, dict]:
    """(manifest, model state dict, config) of a verified checkpoint, tensors memory-mapped."""
    manifest = verify(ckpt)
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True, mmap=True)
    return manifest, state["strategy"]["model"], state.get("config", {})


def inspect(path: str) -> str:
    ckpt = resolve(path)
    manifest, weights, config = load_weights(ckpt)
    total = sum(t.numel() for t in weights.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    lines = [f"{ckpt}", json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1),
             "files: " + ", ".join(f"{n} ({m['bytes']:,} B)" for n, m in manifest["files"].items()),
             f"model: {config.get('model', {}).get('name', '?')}, {len(weights)} tensors, {total:,} parameters, "
             f"dtypes {', '.join(dtypes)}"]
    for name, t in list(weights.items())[:8]:
        lines.append(f"  {name:48} {tuple(t.shape)}")
    if len(weights) > 8:
        lines.append(f"  ... {len(weights) - 8} more")
    return "\n".join(lines)


def export(path: str, fmt: str, out: str | None = None) -> Path:
    """Write the model weights of a checkpoint (or a run's newest) as one safetensors file:
    our names (`safetensors`), open_clip's (`open_clip`, CLIP models) or timm's (`timm`, ViTs)."""
    from lvmtrain.models.convert import lvm_to_open_clip, lvm_to_timm
    from lvmtrain.models.registry import model_family

    ckpt = resolve(path)
    _, weights, config = load_weights(ckpt)
    family = model_family(config["model"]["name"]) if config.get("model") else None
    if fmt == "open_clip":
        if family != "clip":
            raise CheckpointError(f"{ckpt}: --format open_clip needs a CLIP model, this is {family}")
        weights = lvm_to_open_clip(weights)
    elif fmt == "timm":
        if family != "vit":
            raise CheckpointError(f"{ckpt}: --format timm needs a ViT model, this is {family} "
                                  "(open_clip's format holds CLIP's towers)")
        weights = lvm_to_timm(weights)
    target = Path(out) if out else ckpt / f"model.{fmt}.safetensors"
    write_safetensors(weights, target, metadata={"format": "pt", "lvmtrain_checkpoint": str(ckpt), "names": fmt})
    return target


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The safetensors format, written one tensor at a time.

    NOTE: `safetensors.torch.save_file` first turns every tensor into bytes in memory (peak = the
    whole model); here the header is computed from shapes alone and each tensor is copied from
    its memory map to the file in turn, so peak memory is about the largest tensor.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)
