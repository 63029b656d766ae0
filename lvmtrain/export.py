"""`lvmtrain ckpt inspect | export`: read a checkpoint without training code, write usable weights.

A checkpoint holds tensors by the plain model's names whatever the backend that wrote it (see
`distributed/strategy.py`), in torch.distributed.checkpoint's files, so an export is a rename at
most; tensors are read one at a time, whole, whatever the sharding they were saved with, so peak
memory is about the largest tensor, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lvmtrain.checkpoint import MANIFEST, STATE, WEIGHTS, CheckpointError, newest_verified, verify


def resolve(path: str, *, allow_older: bool = False, warn=None) -> tuple[Path, dict]:
    """(checkpoint, manifest), verified: `path` itself, or a run directory's newest checkpoint.

    When newer checkpoints of the run fail verification, that is refused (CheckpointError naming
    each and why): an older step than the user expects must not pass quietly. With `allow_older`,
    the newest that verifies is used and `warn` (a function of one line) is told each skipped one
    and the one used."""
    p = Path(path)
    if (p / STATE).exists() or (p / MANIFEST).exists():
        return p, verify(p)
    skipped: list[tuple[Path, CheckpointError]] = []
    found = newest_verified(p / "checkpoints", on_skip=lambda ckpt, e: skipped.append((ckpt, e)))
    why = "; ".join(f"{ckpt.name} fails verification: {e}" for ckpt, e in skipped)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {STATE}) nor a run with a complete "
                              f"checkpoint" + (f" ({why})" if why else ""))
    if skipped and not allow_older:
        raise CheckpointError(f"{path}: {why}; the newest checkpoint that verifies is the older "
                              f"{found[0].name}: pass --allow-older to use it, or name a checkpoint directory")
    if skipped and warn:
        for ckpt, e in skipped:
            warn(f"skipping checkpoint {ckpt.name}: it fails verification: {e}")
        warn(f"using {found[0]}, older than {skipped[0][0].name} (--allow-older)")
    return found


def run_dir_of(ckpt: Path) -> Path:
    """The run directory of `RUN/checkpoints/step_X`; for a checkpoint elsewhere, its parent."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def default_export_path(ckpt: Path, fmt: str) -> Path:
    """RUN/exports/step_X-safetensors.safetensors, or the folder RUN/exports/step_X-FORMAT/ of the
    folder formats: outside `checkpoints/`, whose retention deletes old step directories with
    anything put in them."""
    exports = run_dir_of(ckpt) / "exports"
    return exports / f"{ckpt.name}-{fmt}" if fmt in FOLDER_FORMATS else exports / f"{ckpt.name}-{fmt}.safetensors"


def check_export_path(target: Path, warn=None) -> None:
    """Refuse an output inside a checkpoint directory of a run (`checkpoints/step_X/`, which
    retention deletes); warn about one elsewhere under `checkpoints/`."""
    target = Path(target).absolute()
    for parent in target.parents:
        if parent.parent.name == "checkpoints" and parent.name.startswith("step_"):
            raise CheckpointError(
                f"--out {target}: inside checkpoint directory {parent}, which checkpoint.keep's retention "
                f"deletes (with the export) once newer checkpoints exist, and whose own files the manifest "
                f"lists; write it elsewhere, e.g. {default_export_path(parent, 'FORMAT')} (the default)")
        if parent.name == "checkpoints" and warn:
            warn(f"--out {target}: under {parent}, which holds the run's checkpoints; an export is safer "
                 f"outside it (e.g. {parent.parent / 'exports'})")
            return


def weight_shapes(ckpt: Path, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{parameter name: (shape, dtype)} of a checkpoint's model, from DCP's metadata alone; with
    `prefix` (a task's backbone, e.g. MAE's "encoder."), only the names under it, stripped of it."""
    meta = dcp.FileSystemReader(str(ckpt / WEIGHTS)).read_metadata().state_dict_metadata
    start = f"model.{prefix}"
    return {key.removeprefix(start): (tuple(m.size), m.properties.dtype) for key, m in meta.items()
            if key.startswith(start) and isinstance(m, dcp.TensorStorageMetadata)}


def read_weight(ckpt: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a checkpoint's model, whole, whatever the sharding it was saved with."""
    tensor = torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "no process group: loading in one process", as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": {name: tensor}}, checkpoint_id=ckpt / WEIGHTS, no_dist=True)
    return tensor


def iter_weights(ckpt: Path, prefix: str = ""):
    """(name, tensor) of the model's weights (under `prefix`, stripped of it), one tensor in memory
    at a time."""
    for name, (shape, dtype) in weight_shapes(ckpt, prefix).items():
        yield name, read_weight(ckpt, prefix + name, shape, dtype)


def load_weights(ckpt: Path) -> tuple[dict, dict, dict]:
    """(manifest, model state dict, config) of a verified checkpoint."""
    manifest = verify(ckpt)
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    return manifest, dict(iter_weights(ckpt)), state.get("config", {})


def inspect(path: str, *, allow_older: bool = False, warn=None) -> str:
    ckpt, manifest = resolve(path, allow_older=allow_older, warn=warn)
    config = torch.load(ckpt / STATE, map_location="cpu", weights_only=True).get("config", {})
    shapes = weight_shapes(ckpt)
    total = sum(torch.Size(shape).numel() for shape, _ in shapes.values())
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, dtype in shapes.values()})
    size = sum(m["bytes"] for m in manifest["files"].values())
    lines = [f"{ckpt}", json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1),
             f"files: {len(manifest['files'])}, {size:,} bytes",
             f"model: {config.get('model', {}).get('name', '?')}, {len(shapes)} tensors, {total:,} parameters, "
             f"dtypes {', '.join(dtypes)}"]
    for name, (shape, _) in list(shapes.items())[:8]:
        lines.append(f"  {name:48} {shape}")
    if len(shapes) > 8:
        lines.append(f"  ... {len(shapes) - 8} more")
    return "\n".join(lines)


FOLDER_FORMATS = {"open_clip": ("open_clip_config.json", "open_clip_model.safetensors"),
                  "timm": ("config.json", "model.safetensors")}
"""Formats written as a folder: (config file, weights file), the names that
`open_clip.create_model_and_transforms` and `timm.create_model` read from a `local-dir:PATH`."""


def export(path: str, fmt: str, out: str | None = None, *, allow_older: bool = False, warn=None,
           teacher: bool = False) -> Path:
    """Write the model of a checkpoint (or a run's newest) for use outside lvmtrain; returns the path.

    `safetensors`: one file of the weights in our names. `open_clip` (CLIP models): a folder that
    `open_clip.create_model_and_transforms("local-dir:PATH")` builds, weights, tokenizer and
    preprocessing included. `timm` (ViTs): a folder that `timm.create_model("local-dir:PATH",
    pretrained=True)` builds. By default under RUN/exports/ (`default_export_path`).
    """
    from lvmtrain.models.convert import lvm_to_open_clip, lvm_to_timm
    from lvmtrain.models.registry import model_family

    ckpt, _ = resolve(path, allow_older=allow_older, warn=warn)
    target = Path(out) if out else default_export_path(ckpt, fmt)
    check_export_path(target, warn)
    config = torch.load(ckpt / STATE, map_location="cpu", weights_only=True).get("config", {})
    family = model_family(config["model"]["name"]) if config.get("model") else None
    # NOTE: the run's config rides along: `lvmtrain eval FILE` rebuilds the model from it
    metadata = {"format": "pt", "lvmtrain_checkpoint": str(ckpt), "names": fmt, "lvmtrain_config": json.dumps(config)}
    if fmt == "safetensors":
        target.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(ckpt, None, target, metadata)
        return target
    if fmt == "open_clip" and family != "clip":
        raise CheckpointError(f"{ckpt}: --format open_clip needs a CLIP model, this is {family}")
    if fmt == "timm" and family != "vit":
        raise CheckpointError(f"{ckpt}: --format timm needs a ViT model, this is {family} "
                              "(open_clip's format holds CLIP's towers)")
    prefix = backbone_prefix(config, teacher=teacher)
    describe = {"open_clip": _open_clip_config, "timm": _timm_config}[fmt]
    folder_config = describe(ckpt, config, resolved_model(ckpt, config["model"], prefix))
    rename = {"open_clip": lvm_to_open_clip, "timm": lvm_to_timm}[fmt]
    config_name, weights_name = FOLDER_FORMATS[fmt]
    write_folder(target, {config_name: lambda p: p.write_text(json.dumps(folder_config, indent=2) + "\n"),
                          weights_name: lambda p: write_safetensors(ckpt, rename, p, metadata, prefix)})
    return target


def backbone_prefix(config: dict, *, teacher: bool = False) -> str:
    """Where the plain model's weights lie in a run's checkpoint: "" but for objectives that wrap
    it (MAE's encoder, DINO's student or, with `teacher`, its teacher)."""
    from lvmtrain.tasks import TASKS, task_name
    from lvmtrain.config.loader import load_config

    task = TASKS[task_name(load_config(None, [], base=("checkpoint", config)))]
    prefix = getattr(task, "teacher_prefix", None) if teacher else task.backbone_prefix
    if prefix is None:
        raise CheckpointError(f"--teacher: a {task.name} run has no teacher")
    return prefix


def resolved_model(ckpt: Path, model: dict, prefix: str = ""):
    """The preset of a run's `model` config with its overrides applied (registry.ViTConfig or
    CLIPConfig), checked against the checkpoint's tensors: a config that does not describe the
    weights is refused rather than exported as a model that will not load."""
    from lvmtrain.models.registry import CLIPConfig, build_model, get_preset

    def given(*keys):
        return {k: model[k] for k in keys if model.get(k) is not None}

    preset, shapes = get_preset(model["name"]), weight_shapes(ckpt, prefix)
    if not isinstance(preset, CLIPConfig) and "head.weight" not in shapes:
        model = {**model, "num_classes": 0}  # a self-supervised backbone: features, no classifier
    bias = {"init_logit_bias": 0.0} if "logit_bias" in shapes else {}
    if isinstance(preset, CLIPConfig):
        cfg = dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, **given("image_size", "patch_size")),
                                  text=dataclasses.replace(preset.text, **given("context_length")))
    else:
        cfg = dataclasses.replace(preset, **given("image_size", "patch_size", "num_classes", "global_pool"))
    with torch.device("meta"):
        built = build_model(model["name"], **given("image_size", "patch_size", "num_classes", "global_pool",
                                                   "context_length"), **bias)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    found = {k: shape for k, (shape, _) in shapes.items()}
    if expected != found:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(
            f"{ckpt}: its config (model: {model}) does not describe its weights: "
            + ", ".join(f"{k} {found.get(k, 'absent')} in the checkpoint, {expected.get(k, 'absent')} by the config"
                        for k in differ[:4]))
    return cfg


def _normalisation(config: dict) -> tuple[list[float], list[float]]:
    from lvmtrain.config.schema import DataConfig

    data = config.get("data", {})
    return list(data.get("mean", DataConfig().mean)), list(data.get("std", DataConfig().std))


def _open_clip_config(ckpt: Path, config: dict, cfg) -> dict:
    """open_clip_config.json: the model, and the preprocessing of our evaluation (a centre square,
    resized; our data's mean and std). open_clip's default tokenizer is CLIP's BPE, ours."""
    from lvmtrain.models.convert import open_clip_model_cfg

    shapes = weight_shapes(ckpt)
    bias = float(read_weight(ckpt, "logit_bias", *shapes["logit_bias"])) if "logit_bias" in shapes else None
    try:
        model_cfg = open_clip_model_cfg(cfg, logit_bias=bias)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: model {config['model']['name']} has no open_clip form: {e}; "
                              "export --format safetensors and load it with lvmtrain instead") from None
    mean, std = _normalisation(config)
    # NOTE: our resize is area-averaging when it shrinks 2x or more, bilinear otherwise; torchvision's
    # bilinear on PIL images antialiases, which comes closest (equal when no resize is needed).
    preprocess = {"size": cfg.vision.image_size, "mode": "RGB", "mean": mean, "std": std,
                  "interpolation": "bilinear", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess, "lvmtrain": _provenance(ckpt, config)}


def _timm_config(ckpt: Path, config: dict, cfg) -> dict:
    """config.json in timm's pretrained-config layout: architecture, model_args, pretrained_cfg."""
    from lvmtrain.models.convert import TIMM_ARCHITECTURES, timm_model_args

    mean, std = _normalisation(config)
    pretrained_cfg = {"tag": "lvmtrain", "custom_load": False, "input_size": [3, cfg.image_size, cfg.image_size],
                      "fixed_input_size": True, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                      "mean": mean, "std": std, "num_classes": cfg.num_classes, "pool_size": None,
                      "first_conv": "patch_embed.proj", "classifier": "head"}
    return {"architecture": TIMM_ARCHITECTURES.get(config["model"]["name"], "vit_base_patch16_224"),
            "num_classes": cfg.num_classes, "num_features": cfg.width, "global_pool": cfg.global_pool,
            "model_args": timm_model_args(cfg), "pretrained_cfg": pretrained_cfg,
            "lvmtrain": _provenance(ckpt, config)}


def _provenance(ckpt: Path, config: dict) -> dict:
    return {"checkpoint": str(ckpt), "model": config["model"]}


def write_folder(target: Path, files: dict) -> None:
    """A folder of `files` ({name: function writing that file at a path}), all or nothing: built
    as TARGET.tmp, then renamed. An earlier export at `target` (a folder of these names and no
    others) is replaced; anything else there is refused, never deleted."""
    ours = set(files) | {f"{name}.tmp" for name in files}

    def is_earlier_export(folder: Path) -> bool:
        return folder.is_dir() and {p.name for p in folder.iterdir()} <= ours

    staging, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for folder in (target, staging, old):
        if folder.exists() and not is_earlier_export(folder):
            raise CheckpointError(f"--out {target}: {folder} exists and is not an export of this format "
                                  f"(which holds {', '.join(files)} only); name a new folder")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, write in files.items():
        write(staging / name)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(ckpt: Path, rename, path: Path, metadata: dict[str, str], prefix: str = "") -> None:
    """The checkpoint's weights in the safetensors format, one tensor in memory at a time.

    NOTE: `safetensors.torch.save_file` wants every tensor in memory at once (and then a byte copy
    of each); here the header is computed from DCP's metadata, and each tensor is read, renamed
    (`rename`: one tensor -> {name: tensor} in the target's names) and written in turn.
    """
    shapes = weight_shapes(ckpt, prefix)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        probe = {name: torch.empty(shape, dtype=dtype, device="meta")}
        for out_name, t in (rename(probe) if rename else probe).items():
            size = t.numel() * t.element_size()
            header[out_name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, tensor in iter_weights(ckpt, prefix):
            for t in (rename({name: tensor}) if rename else {name: tensor}).values():
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)
