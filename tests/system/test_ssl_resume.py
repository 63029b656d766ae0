"""Self-supervised runs killed and resumed: MAE and DINO continue bit-exact (fp32, DDP, 2 ranks):
masks, crops, the teacher, the centre and the schedules all come back; a DINO run saved on 2
FSDP2 ranks goes on, on one process; the exports load in timm with the backbone's features."""

import importlib.util
import json
import math

import pytest
import torch

from lvmtrain.export import load_weights
from tests.conftest import read_metrics, run_lvmtrain
from tests.system.test_data_resume import kill_one_rank_after

pytestmark = pytest.mark.slow
STEPS = 12
SMALL_DINO = ["ssl.out_dim=64", "ssl.head_hidden=32", "ssl.head_bottleneck=16", "ssl.local_crops=2",
              "ssl.local_size=14", "ssl.centering=centering", "ssl.momentum_start=0.9", "ssl.ibot_weight=1"]


def args(tmp_path, shards, name, task, *extra):
    return ["train", f"configs/debug/{task}.yaml", f"data.train={shards['train']}", "data.batch_size=8",
            "data.workers=1", f"train.steps={STEPS}", "train.epochs=0", "checkpoint.every=6", "log.every=1",
            "eval.sets=[]", "optim.warmup_steps=2", f"log.dir={tmp_path}", f"run.name={name}",
            *(SMALL_DINO if task == "dino" else ["ssl.decoder_depth=1", "ssl.decoder_width=32"]), *extra]


def logged(run_dir, keys=("loss",)):
    return {m["step"]: tuple(m[k] for k in keys) for m in read_metrics(run_dir) if "loss" in m}


@pytest.mark.parametrize("task", ["mae", "dino"])
def test_ssl_resumes_bit_exact_after_kill_9(tmp_path, shards, task):
    keys = ("loss", "ibot_loss", "momentum", "teacher_temp") if task == "dino" else ("loss",)
    run_lvmtrain(args(tmp_path, shards, "straight", task), nproc=2)
    kill_one_rank_after(tmp_path, shards, "killed", 6, args(tmp_path, shards, "killed", task))
    resumed = run_lvmtrain(args(tmp_path, shards, "killed", task), nproc=2)
    assert "resumed from" in resumed.stdout
    ref, got = logged(tmp_path / "straight", keys), logged(tmp_path / "killed", keys)
    assert {s: got[s] for s in ref if s > 6} == {s: ref[s] for s in ref if s > 6}
    assert len({v[0] for v in ref.values()}) == STEPS  # every step trained on new data (not a replay)
    ref_w = load_weights(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}")[1]
    got_w = load_weights(tmp_path / "killed" / "checkpoints" / f"step_{STEPS:08d}")[1]
    assert all(torch.equal(got_w[n], ref_w[n]) for n in ref_w)
    if task == "dino":  # the teacher is in the checkpoint, and it moved away from the student
        assert any(not torch.equal(ref_w[f"teacher.{n[8:]}"], ref_w[n]) for n in ref_w if n.startswith("student."))


def test_dino_saved_on_two_fsdp2_ranks_resumes_on_one_and_exports_to_timm(tmp_path, shards):
    timm = pytest.importorskip("timm")
    knn = f"eval.sets=[{{name: knn, kind: knn, data: '{shards['val']}', train: '{shards['val']}', k: 5}}]"
    kill_one_rank_after(tmp_path, shards, "d", 6, args(tmp_path, shards, "d", "dino", "parallel.backend=fsdp",
                                                        "eval.every=6", knn))
    resumed = run_lvmtrain(args(tmp_path, shards, "d", "dino", "data.batch_size=16"), nproc=1)
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout
    # the teacher's k-NN, scored on 2 FSDP2 ranks at step 6 (its encode_image gathers the teacher's shards)
    assert [m["eval/knn/samples"] for m in read_metrics(tmp_path / "d") if "eval/knn/samples" in m][:1] == [512]
    steps = logged(tmp_path / "d", ("loss", "momentum"))
    assert sorted(steps) == list(range(1, STEPS + 1))
    # the momentum schedule goes on from the saved step (the task's state), not from 0
    cosine = [1 - (1 - 0.9) * (math.cos(math.pi * (s - 1) / STEPS) + 1) / 2 for s in range(1, STEPS + 1)]
    assert [steps[s][1] for s in range(1, STEPS + 1)] == pytest.approx(cosine, abs=1e-6)

    from lvmtrain.models.registry import build_model

    weights = load_weights(tmp_path / "d" / "checkpoints" / f"step_{STEPS:08d}")[1]
    images = torch.randn(3, 3, 28, 28)
    for flag, prefix in (([], "student.backbone."), (["--teacher"], "teacher.backbone.")):
        out = tmp_path / f"timm{len(flag)}"
        run_lvmtrain(["ckpt", "export", str(tmp_path / "d"), "--format", "timm", "--out", str(out), *flag])
        ours = build_model("vit_debug", image_size=28, patch_size=7, num_classes=0, global_pool="avg").eval()
        ours.load_state_dict({n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)})
        theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(images), ours(images), rtol=1e-5, atol=1e-5)
        assert json.loads((out / "config.json").read_text())["num_classes"] == 0


def test_a_classifier_starts_from_an_mae_run_and_from_timm_weights(tmp_path, shards):
    """model.init_from: the encoder of an MAE run (its head left at init), then its timm export."""
    from lvmtrain.models.init_from import init_backbone
    from lvmtrain.models.registry import build_model

    run_lvmtrain(args(tmp_path, shards, "m", "mae", "train.steps=2"))
    encoder = load_weights(tmp_path / "m" / "checkpoints" / "step_00000002")[1]
    classifier = build_model("vit_debug", image_size=28, patch_size=4, global_pool="avg", num_classes=10)
    assert "head left at its init" in init_backbone(classifier, str(tmp_path / "m"))
    assert torch.equal(classifier.state_dict()["blocks.0.attn.qkv.weight"], encoder["encoder.blocks.0.attn.qkv.weight"])
    run_lvmtrain(["ckpt", "export", str(tmp_path / "m"), "--format", "timm", "--out", str(tmp_path / "t")])
    fresh = build_model("vit_debug", image_size=28, patch_size=4, global_pool="avg", num_classes=10)
    init_backbone(fresh, str(tmp_path / "t"))
    assert torch.equal(fresh.state_dict()["pos_embed"], encoder["encoder.pos_embed"])
    wrong = build_model("vit_debug", image_size=28, patch_size=7, global_pool="avg", num_classes=10)
    with pytest.raises(Exception, match="model.init_from: .* has other shapes for"):
        init_backbone(wrong, str(tmp_path / "t"))
    # and a training run starting from it says so
    proc = run_lvmtrain(["train", "configs/debug/vit.yaml", f"data.train={shards['train']}", "data.val=",
                         "model.patch_size=4", f"model.init_from={tmp_path / 'm'}", "train.steps=1", "train.epochs=0",
                         "data.workers=0", f"log.dir={tmp_path}", "run.name=ft"])
    assert "model.init_from: " in proc.stdout


def test_mae_trains_and_is_scored_under_fsdp2(tmp_path, shards):
    """MAE's encoder on the seen patches and its k-NN features, both gathered from FSDP2 shards."""
    knn = f"eval.sets=[{{name: knn, kind: knn, data: '{shards['val']}', train: '{shards['val']}', k: 5}}]"
    run_lvmtrain(args(tmp_path, shards, "f", "mae", "parallel.backend=fsdp", "train.steps=3", knn), nproc=2)
    final = [m for m in read_metrics(tmp_path / "f") if "eval/knn/top1" in m][-1]
    assert final["step"] == 3 and final["eval/knn/samples"] == 512


def test_dino_under_zero3_saves_its_teacher_and_resumes_under_ddp(tmp_path, shards):
    """The teacher has no master copy or moments in ZeRO (it is not trained): it is saved from its
    own (gathered) values, and comes back on another backend and world size."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is an extra: pip install 'lvmtrain[deepspeed]' (make test does)")
    zero3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.lr=1e-2"]
    run_lvmtrain(args(tmp_path, shards, "z", "dino", "train.steps=6", *zero3), nproc=2)
    saved = load_weights(tmp_path / "z" / "checkpoints" / "step_00000006")[1]
    teacher = {n: t for n, t in saved.items() if n.startswith("teacher.")}
    assert teacher and any(not torch.equal(t, saved["student." + n[8:]]) for n, t in teacher.items())
    resumed = run_lvmtrain(args(tmp_path, shards, "z", "dino", "data.batch_size=16", "optim.lr=1e-2"), nproc=1)
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout
    assert logged(tmp_path / "z").keys() >= set(range(7, STEPS + 1))
