"""`lvmtrain eval SOURCE [--set NAME=KIND:SPEC[,key=value...]] [key=value ...]`: score a checkpoint
(or a run's newest) on evaluation sets, on one process or sharded over torchrun's ranks under any
backend, without the training loop; the scores go to a JSON file and stdout."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from lvmtrain.config.schema import ConfigError, EvalSetConfig

SET_OPTIONS = [f.name for f in dataclasses.fields(EvalSetConfig) if f.name not in ("name", "kind", "data")]


def parse_set(text: str) -> dict:
    """"NAME=KIND:SPEC[,key=value...]" -> an `eval.sets` entry (values read as YAML: lists as [a, b])."""
    import yaml

    name, sep, rest = text.partition("=")
    kind, sep2, rest = rest.partition(":")
    if not sep or not sep2 or not name or not kind:
        raise ConfigError(f"--set {text!r}: write NAME=KIND:SHARDS[,key=value...], e.g. "
                          f"fmnist=zeroshot:data/test-{{0..1}}.tar,class_names_file=classes.txt")
    # NOTE: split only before a known option: shard specs hold commas ({a,b}) and so do lists
    parts = re.split(rf",(?=(?:{'|'.join(SET_OPTIONS)})=)", rest)
    entry = {"name": name, "kind": kind, "data": parts[0]}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        try:
            entry[key] = value if key.endswith(("_file", "train")) else yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {name}: {key}={value!r} is not valid YAML ({problem}); quote the items of a "
                              f"list that hold braces: templates=['a photo of a {{}}.']") from None
    return entry


def _source(source: str):
    """(path, the run's config dict, a function returning the weights by our names) of a checkpoint
    or run directory, or of a `ckpt export --format safetensors` file (its metadata holds the config)."""
    from lvmtrain.checkpoint_files import STATE
    from lvmtrain.export import iter_weights, resolve

    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("names") != "safetensors" or "lvmtrain_config" not in meta:
            raise ConfigError(f"{path}: not an lvmtrain export with its config (`lvmtrain ckpt export RUN` writes "
                              f"one); open_clip / timm folders load in those libraries")
        return path, json.loads(meta["lvmtrain_config"]), lambda: load_file(str(path))
    ckpt, _ = resolve(source)
    saved = torch.load(ckpt / STATE, map_location="cpu", weights_only=True).get("config")
    if not saved:
        raise ConfigError(f"{ckpt}: its state holds no config")
    return ckpt, saved, lambda: dict(iter_weights(ckpt))


def evaluate_checkpoint(source: str, sets: list[str], overrides: list[str], *, out: str | None = None) -> dict:
    """Scores of `source` (a checkpoint, a run directory, or our safetensors export) on the `--set` sets, else on
    the run's own (data.val and eval.sets); collective under torchrun. `overrides`: config keys
    over the checkpoint's config (parallel.backend, eval.batch_size, data.workers...)."""
    from lvmtrain.assembly import build_task_and_model
    from lvmtrain.config.loader import load_config
    from lvmtrain.data.shards import RemoteIO
    from lvmtrain.data.transforms import ImageNormalizer
    from lvmtrain.distributed.dims import barrier, init_distributed
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.evaluation import Evaluator, resolve_sets
    from lvmtrain.tasks import TASKS, task_name

    ckpt, saved, weights = _source(source)
    if sets:  # only the sets asked for
        saved = {**saved, "data": {**saved["data"], "val": ""},
                 "eval": {**saved["eval"], "sets": [parse_set(s) for s in sets]}}
    cfg = load_config(None, overrides, base=(str(ckpt), saved))
    if not cfg.data.val and not cfg.eval.sets:
        raise ConfigError(f"{ckpt}: the run has no evaluation sets: give some with --set NAME=KIND:SHARDS")
    dims = init_distributed(cfg.parallel, cfg.train.threads)
    strategy = build_strategy(cfg.parallel, dims, cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    task, model = build_task_and_model(cfg, strategy)
    if any(p.is_meta for p in model.parameters()) or any(hasattr(p, "ds_numel") for p in model.parameters()):
        raise ConfigError("parallel.meta_init: lvmtrain eval loads whole weights before sharding; set "
                          "parallel.meta_init=false")
    missing, unexpected = model.load_state_dict(weights(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt}: its weights do not fit model '{cfg.model.name}' (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    # NOTE: wrapped as training wraps it (FSDP2 and ZeRO-3 shard it: every forward is a collective)
    strategy.setup(model, cfg.optim, 1, micro_batch=cfg.eval.batch_size, accum=1)
    eval_sets = resolve_sets(cfg, TASKS[task_name(cfg)].eval_kind, RemoteIO.from_config(cfg.data))
    evaluator = Evaluator(eval_sets, cfg.data, dims, image_size=model.image_size, batch_size=cfg.eval.batch_size,
                          tokenizer=task.tokenizer)
    scores = evaluator(strategy.unwrapped(), normalize=ImageNormalizer(cfg.data.mean, cfg.data.std),
                       autocast=strategy.autocast)
    result = {"source": str(ckpt), "world_size": dims.world, "backend": cfg.parallel.backend, "scores": scores}
    if out and dims.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    barrier()  # NOTE: every rank returns once rank 0 has written
    return result
