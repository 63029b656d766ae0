"""Training objectives by name (`train.task`); the model preset picks the default."""

from __future__ import annotations

from lvmtrain.config.schema import ConfigError
from lvmtrain.tasks.base import Task, accumulate
from lvmtrain.tasks.classify import ClassifyTask
from lvmtrain.tasks.contrastive import ClipTask, ContrastiveTask
from lvmtrain.tasks.dino import DinoTask
from lvmtrain.tasks.mae import MaeTask
from lvmtrain.tasks.siglip import SigLipTask

TASKS: dict[str, type] = {"classify": ClassifyTask, "clip": ClipTask, "siglip": SigLipTask, "mae": MaeTask,
                          "dino": DinoTask}


def task_name(cfg) -> str:
    """`train.task`, or the preset's own objective when it is empty."""
    from lvmtrain.models.registry import default_task

    return cfg.train.task or default_task(cfg.model.name)


def build_task(cfg, *, context_length: int | None = None) -> Task:
    """The objective of a run (cfg: Config); image-text ones get a tokenizer of the text tower's
    `context_length`."""
    return TASKS[task_name(cfg)].from_config(cfg, context_length=context_length)


def check_task(cfg) -> None:
    """Refuse a task the model cannot serve (ConfigError naming train.task), before any work."""
    from lvmtrain.models.registry import model_family

    name = task_name(cfg)
    if name not in TASKS:
        raise ConfigError(f"train.task: unknown task '{name}' (valid: {', '.join(sorted(TASKS))}; empty: the preset's)")
    reads_text = "text" in TASKS[name].fields
    if (model_family(cfg.model.name) == "clip") != reads_text:
        kind = "an image-text model (clip_*, siglip_*)" if reads_text else "a classifier (vit_*)"
        raise ConfigError(f"train.task: '{name}' needs {kind}; model.name is '{cfg.model.name}'")


__all__ = ["TASKS", "ClassifyTask", "ClipTask", "ContrastiveTask", "DinoTask", "MaeTask", "SigLipTask", "Task", "accumulate", "build_task",
           "check_task", "task_name"]
