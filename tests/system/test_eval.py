"""Evaluation sets scored sharded over ranks decide exactly as one process, for every kind and
under DDP, FSDP2 and ZeRO-3; in training they go to metrics.jsonl (eval/NAME/...) and the report,
and `lvmtrain eval` scores a checkpoint as the training run did."""

import importlib.util
import json

import pytest

from tests.conftest import read_metrics, run_lvmtrain

pytestmark = pytest.mark.slow
BACKENDS = [["parallel.backend=ddp"], ["parallel.backend=fsdp"],
            ["parallel.backend=deepspeed", "parallel.zero_stage=3"]]


def sets(shards, classes_file, captions):
    # NOTE: the first training shard (768 images) as the bank and the probe's data: fewer forwards, same paths
    bank = first_shard(shards)
    return [f"--set=zs=zeroshot:{shards['val']},class_names_file={classes_file}",
            f"--set=rt=retrieval:{captions}",
            f"--set=kn=knn:{shards['val']},train={bank},k=5",
            f"--set=ln=linear:{shards['val']},train={bank},probe_steps=20,probe_weight_decay=[1e-4, 1e-2]"]


def first_shard(shards) -> str:
    return shards["train"].replace("{00000..00001}", "00000")


def scores(run, args, nproc, *overrides):
    out = run.parent / f"eval-{nproc}-{'-'.join(o.split('=')[1] for o in overrides) or 'plain'}.json"
    run_lvmtrain(["eval", str(run), *args, f"--out={out}", "eval.batch_size=120", "data.workers=1", *overrides],
                 nproc=nproc)
    return json.loads(out.read_text())["scores"]


@pytest.fixture(scope="module")
def clip_run(shards, caption_shards, tmp_path_factory):
    """A tiny CLIP trained 3 steps, evaluated in training on a k-NN set (eval.sets)."""
    tmp = tmp_path_factory.mktemp("clip")
    knn = f"[{{name: kn, kind: knn, data: '{shards['val']}', train: '{first_shard(shards)}', k: 5}}]"
    run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=",
                  "data.batch_size=32", "data.workers=0", "train.steps=3", "train.epochs=0", "eval.batch_size=120",
                  f"eval.sets={knn}", f"log.dir={tmp}", "run.name=c"])
    (tmp / "classes.json").write_text(json.dumps(shards["classes"]))
    return tmp / "c", tmp / "classes.json", caption_shards


def test_training_eval_sets_are_logged_reported_and_rescored_alike_by_lvmtrain_eval(clip_run):
    run, _, _ = clip_run
    final = [m for m in read_metrics(run) if "eval/kn/top1" in m][-1]
    assert final["step"] == 3 and final["eval/kn/samples"] == 512 and final["eval/kn/bank"] == 768
    assert 0.1 < final["eval/kn/top1"] <= 1 and final["eval/kn/top5"] >= final["eval/kn/top1"]
    # the run's own sets, scored again from its checkpoint: the same numbers
    again = scores(run, [], 1)
    assert {k: again[k] for k in final if k.startswith("eval/")} == {k: v for k, v in final.items()
                                                                     if k.startswith("eval/")}
    # and from its safetensors export, whose metadata carries the run's config
    exported = run.parent / "c.safetensors"
    run_lvmtrain(["ckpt", "export", str(run), "--out", str(exported)])
    assert scores(exported, [], 1) == again
    proc = run_lvmtrain(["report", str(run)])
    assert "eval.png" in proc.stdout and "kn/top1" in (run / "report" / "report.md").read_text()


@pytest.fixture(scope="module")
def one_process(clip_run, shards):
    run, classes, captions = clip_run
    return scores(run, sets(shards, classes, captions), 1)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: "-".join(o.split("=")[1] for o in b))
def test_two_ranks_score_every_kind_exactly_as_one_process(clip_run, one_process, shards, backend):
    if backend[0].endswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is an extra: pip install 'lvmtrain[deepspeed]' (make test does)")
    run, classes, captions = clip_run
    one = one_process
    two = scores(run, sets(shards, classes, captions), 2, *backend)
    assert two == one
    assert one["eval/zs/samples"] == 512 and one["eval/rt/images"] == 512 and one["eval/rt/captions"] == 1024
    assert one["eval/ln/weight_decay"] in (1e-4, 1e-2) and one["eval/kn/bank"] == 768
    for key in ("eval/zs/top1", "eval/kn/top1", "eval/ln/top1", "eval/rt/t2i_R@10", "eval/rt/i2t_R@10"):
        assert 0 < one[key] <= 1, key


def test_a_classifier_is_scored_by_its_head_and_its_features_sharded_as_one_process(shards, tmp_path):
    run_lvmtrain(["train", "configs/debug/vit.yaml", f"data.train={shards['train']}", f"data.val={shards['val']}",
                  "data.batch_size=32", "data.workers=0", "train.steps=3", "train.epochs=0", f"log.dir={tmp_path}",
                  "run.name=v"])
    final = [m for m in read_metrics(tmp_path / "v") if "eval/val/top1" in m][-1]
    args = [f"--set=cl=classify:{shards['val']}", f"--set=kn=knn:{shards['val']},train={first_shard(shards)}"]
    one = scores(tmp_path / "v", args, 1)
    assert one["eval/cl/top1"] == final["eval/val/top1"]  # data.val in training is the set `val`
    assert scores(tmp_path / "v", args, 2, "parallel.backend=fsdp") == one
    if importlib.util.find_spec("deepspeed") is not None:
        assert scores(tmp_path / "v", args, 2, "parallel.backend=deepspeed", "parallel.zero_stage=3") == one
