"""Evaluation sets: `eval.sets` (and the legacy data.val), checked before any work and resolved
into what the evaluator scores."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lvmtrain.config.schema import ConfigError, EvalSetConfig
from lvmtrain.data.shards import DataError, RemoteIO, ShardSet
from lvmtrain.distributed.dims import from_rank0

BUILTIN_TEMPLATES = {"openai_imagenet": "openai_imagenet_templates.txt"}
NEEDS_TEXT = ("zeroshot", "retrieval")  # kinds that need the model's text tower
NEEDS_TRAIN = ("knn", "linear")  # kinds fitted on a labelled split of their own
LABELLED = ("zeroshot", "knn", "linear", "classify")
LEGACY = "val"  # the name of the set data.val makes


@dataclass
class EvalSet:
    """One set, resolved: its shards counted (rank 0 reads, every rank gets them) and its class
    names and prompts read."""

    name: str
    kind: str
    data: ShardSet
    train: ShardSet | None = None
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    k: int = 20
    temperature: float = 0.07
    probe_steps: int = 100
    probe_weight_decay: list[float] = field(default_factory=lambda: [1e-4])


def set_configs(cfg, eval_kind: str) -> list[EvalSetConfig]:
    """`eval.sets`, with data.val (+ eval.class_names / eval.templates) as the set "val" of
    `eval_kind` (the task's: zeroshot for image-text models, classify for classifiers)."""
    sets = list(cfg.eval.sets)
    if cfg.data.val:
        sets.insert(0, EvalSetConfig(name=LEGACY, kind=eval_kind, data=cfg.data.val,
                                     class_names=list(cfg.eval.class_names), templates=list(cfg.eval.templates)))
    return sets


def check_set_configs(cfg, family: str) -> None:
    """Refuse (ConfigError naming eval.sets[i].KEY) a set the model cannot be scored on, or that
    lacks what its kind needs, before any work. Files named are read here."""
    from lvmtrain.tasks import TASKS, task_name

    task = TASKS.get(task_name(cfg))
    if cfg.data.val and task is not None and task.eval_kind in NEEDS_TRAIN:
        raise ConfigError(f"data.val: a {task.name} run has no classifier to score data.val with; name its sets in "
                          f"eval.sets (kind knn or linear, with a labelled train split), and leave data.val empty")
    names = [LEGACY] if cfg.data.val else []
    for i, s in enumerate(cfg.eval.sets):
        key = f"eval.sets[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", s.name):
            raise ConfigError(f"{key}.name: {s.name!r}: give each set a name of letters, digits, - and _ "
                              f"(its scores go to eval/NAME/...)")
        if s.name in names:
            why = " (data.val is the set 'val')" if s.name == LEGACY and cfg.data.val else ""
            raise ConfigError(f"{key}.name: '{s.name}' is used twice{why}; name each set apart")
        names.append(s.name)
        if not s.data:
            raise ConfigError(f"{key}.data: set '{s.name}' has no shards")
        if s.kind in NEEDS_TEXT and family != "clip":
            raise ConfigError(f"{key}.kind: {s.kind} needs an image-text model (clip_*, siglip_*); model.name is "
                              f"'{cfg.model.name}': use knn, linear or classify")
        if s.kind == "classify" and family == "clip":
            raise ConfigError(f"{key}.kind: classify scores a classifier's own head; '{cfg.model.name}' has none: "
                              f"use zeroshot, knn or linear")
        if s.kind in NEEDS_TRAIN and not s.train:
            raise ConfigError(f"{key}.train: {s.kind} needs labelled training shards (its memory bank / probe data)")
        if s.kind not in NEEDS_TRAIN and s.train:
            raise ConfigError(f"{key}.train: only knn and linear sets read a training split")
        if s.kind == "zeroshot" and not class_names(s, key):
            raise ConfigError(f"{key}.class_names: zeroshot needs the class names (or class_names_file)")
        if s.kind == "zeroshot":
            templates(s, key, [])
        if s.k <= 0 or s.temperature <= 0 or s.probe_steps <= 0 or not s.probe_weight_decay \
                or min(s.probe_weight_decay) < 0:
            raise ConfigError(f"{key}: k, temperature and probe_steps must be > 0, probe_weight_decay a non-empty "
                              f"list of values >= 0")


def class_names(s: EvalSetConfig, key: str) -> list[str]:
    if s.class_names or not s.class_names_file:
        return list(s.class_names)
    path = Path(s.class_names_file)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{key}.class_names_file: {path}: cannot be read ({e.strerror or e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{key}.class_names_file: {path}: not valid JSON ({e})") from None
        names = data.get("class_names") if isinstance(data, dict) else data
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{key}.class_names_file: {path}: give a list of names, or an object whose "
                              f"\"class_names\" is one")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def templates(s: EvalSetConfig, key: str, fallback: list[str]) -> list[str]:
    if s.templates:
        found = list(s.templates)
    elif s.templates_file in BUILTIN_TEMPLATES:
        found = resources.files("lvmtrain").joinpath("assets", BUILTIN_TEMPLATES[s.templates_file]).read_text().splitlines()
    elif s.templates_file:
        try:
            found = Path(s.templates_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"{key}.templates_file: {s.templates_file}: cannot be read ({e.strerror or e}); "
                              f"give a file of prompts or one of: {', '.join(BUILTIN_TEMPLATES)}") from None
    else:
        found = list(fallback)
    found = [t.strip() for t in found if t.strip()]
    bad = [t for t in found if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"{key}.templates: {bad[0]!r} must hold one {{}} (where the class name goes)")
    return found


def resolve_sets(cfg, eval_kind: str, io: RemoteIO | None = None) -> list[EvalSet]:
    """Every set of the run, its shards counted once by rank 0 (collective)."""
    out = []
    for i, s in enumerate(set_configs(cfg, eval_kind)):
        key = "data.val" if s.name == LEGACY and cfg.data.val and i == 0 else f"eval.sets[{i - bool(cfg.data.val)}]"
        data = from_rank0(lambda spec=s.data: ShardSet.from_spec(spec, io), DataError)
        train = from_rank0(lambda spec=s.train: ShardSet.from_spec(spec, io), DataError) if s.train else None
        out.append(EvalSet(name=s.name, kind=s.kind, data=data, train=train, class_names=class_names(s, key),
                           templates=templates(s, key, cfg.eval.templates) if s.kind == "zeroshot" else [],
                           k=s.k, temperature=s.temperature, probe_steps=s.probe_steps,
                           probe_weight_decay=list(s.probe_weight_decay)))
    return out
