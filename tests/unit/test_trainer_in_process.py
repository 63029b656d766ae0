"""A run built and trained in this process, no subprocess: the seam between assembly and loop."""

import pytest

from lvmtrain.assembly import build_run
from lvmtrain.config import load_config
from lvmtrain.metrics import due
from lvmtrain.trainer import Trainer
from tests.conftest import REPO, read_metrics


@pytest.mark.parametrize("task", ["clip", "siglip"])
def test_a_run_trains_in_process(tmp_path, shards, task):
    """Built by `build_run`, trained by `Trainer.train()` in this process; the task comes from
    the registry by name, and accumulation (2 micro-batches) goes through the task's gradient cache."""
    cfg = load_config(str(REPO / "configs/debug/clip.yaml"), [
        f"data.train={shards['train']}", f"data.val={shards['val']}", "data.workers=0", "data.batch_size=16",
        "train.steps=4", "train.epochs=0", "train.grad_accum_steps=2", "log.every=2", "log.wandb=disabled",
        "checkpoint.every=0", f"train.task={task}", f"log.dir={tmp_path}", "run.name=r",
        "eval.class_names=[" + ",".join(shards["classes"]) + "]"])
    parts = build_run(cfg)
    assert parts.task.name == task and parts.task.fields == ("text",)
    trainer = Trainer(parts)
    result = trainer.train()
    assert trainer.step == 4 and result["eval/val/samples"] == 512
    logged = [m for m in read_metrics(tmp_path / "r") if "loss" in m]
    assert [m["step"] for m in logged] == [2, 4]
    assert ("logit_bias" in logged[-1]) == (task == "siglip")
    state = trainer.state_dict()
    assert set(state) >= {"strategy", "task", "step", "cursor", "bad_samples"}


def test_due_answers_for_logging_eval_and_saving():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]
