from lvmtrain.tasks.classify import ClassifyTask
from lvmtrain.tasks.contrastive import ContrastiveTask


def build_task(family: str, optim_cfg):
    """The loss of a model family: "vit" -> classification, "clip" -> contrastive."""
    if family == "clip":
        return ContrastiveTask()
    return ClassifyTask(label_smoothing=optim_cfg.label_smoothing)


__all__ = ["ClassifyTask", "ContrastiveTask", "build_task"]
