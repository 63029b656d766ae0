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


@pytest.mark.parametrize("task", ["mae", "dino"])
def test_a_self_supervised_run_trains_in_process(tmp_path, shards, task):
    """MAE and DINO through the same seam: the task wraps the backbone (a decoder; heads and a
    teacher), DINO's loader makes its crops, and the k-NN set scores the features."""
    knn = f"[{{name: knn, kind: knn, data: '{shards['val']}', train: '{shards['val']}', k: 5}}]"
    small = (["ssl.out_dim=64", "ssl.head_hidden=32", "ssl.head_bottleneck=16", "ssl.local_crops=2",
              "ssl.local_size=14", "ssl.ibot_weight=1"] if task == "dino" else ["ssl.decoder_depth=1", "ssl.decoder_width=32"])
    cfg = load_config(str(REPO / f"configs/debug/{task}.yaml"), [
        f"data.train={shards['train']}", "data.workers=0", "data.batch_size=8", "train.steps=2", "train.epochs=0",
        "log.every=1", "log.wandb=disabled", "checkpoint.every=0", f"log.dir={tmp_path}", "run.name=r",
        f"eval.sets={knn}", *small])
    parts = build_run(cfg)
    assert parts.task.name == task
    trainer = Trainer(parts)
    result = trainer.train()
    assert trainer.step == 2 and result["eval/knn/samples"] == 512 and 0 < result["eval/knn/top1"] <= 1
    if task == "dino":
        assert trainer.task.step == 2 and set(parts.strategy.unwrapped().teacher.state_dict()) == \
            set(parts.strategy.unwrapped().student.state_dict())
