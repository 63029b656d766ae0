"""Checkpoints: atomic under kill -9 at any point of a save, verified on load, async, exported."""

import shutil
import time
from pathlib import Path

import pytest
import torch

from lvmtrain.checkpoint import SHARDED, CheckpointError, CheckpointManager, verify
from lvmtrain.config.schema import CheckpointConfig
from lvmtrain.export import load_weights
from tests.conftest import read_metrics, run_lvmtrain


def vit(tmp_path, shards, name, *extra):
    return ["train", "configs/debug/vit.yaml", f"data.train={shards['train']}", "data.val=", "data.batch_size=32",
            "data.workers=0", "optim.warmup_steps=2", "log.every=1", f"log.dir={tmp_path}", f"run.name={name}",
            "train.epochs=0", *extra]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """An uninterrupted 6-step run saving every 2 steps."""
    tmp = tmp_path_factory.mktemp("straight")
    run_lvmtrain(vit(tmp, shards, "s", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5"))
    return tmp / "s"


@pytest.mark.parametrize("point, resumed", [("before_state", 2), ("before_manifest", 2), ("before_rename", 2),
                                            ("before_latest", 4)])
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, shards, straight, point, resumed):
    """SIGKILL at each point of the step-4 save: `auto` resumes from the newest *complete*
    checkpoint (step 2, or step 4 once renamed) and the run ends as the uninterrupted one."""
    args = vit(tmp_path, shards, "k", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5")
    proc = run_lvmtrain(args, env={"LVMTRAIN_CRASH_AT": f"{point}@4"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_lvmtrain(args)
    assert f"resumed from {tmp_path / 'k' / 'checkpoints' / f'step_{resumed:08d}'} at step {resumed}" in proc.stdout
    assert not list((tmp_path / "k" / "checkpoints").glob("*.tmp"))  # the half-written save is gone
    assert losses(tmp_path / "k")[6] == losses(straight)[6]
    final = load_weights(tmp_path / "k" / "checkpoints" / "step_00000006")[1]
    expected = load_weights(straight / "checkpoints" / "step_00000006")[1]
    assert final.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(final[name], t), name


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_altered_checkpoint_is_refused_by_name_and_auto_falls_back(tmp_path, straight, damage):
    run = tmp_path / "s"
    shutil.copytree(straight, run)
    newest = run / "checkpoints" / "step_00000006"
    victim = {"flip_byte": newest / "weights" / "__0_0.distcp", "truncate": newest / "rank00000.pt",
              "delete": newest / "state.pt"}[damage]
    if damage == "flip_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    else:
        victim.unlink()
    with pytest.raises(CheckpointError, match=str(victim)):
        verify(newest)
    dims = type("Dims", (), {"is_main": True, "rank": 0, "world": 1, "device": torch.device("cpu")})()
    manager = CheckpointManager(CheckpointConfig(resume="auto"), run, dims)
    assert manager.find_resume() == run / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match=str(victim)):
        CheckpointManager(CheckpointConfig(resume=str(newest)), run, dims).find_resume()


def test_async_save_writes_the_same_checkpoints(tmp_path, shards, straight):
    run_lvmtrain(vit(tmp_path, shards, "a", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5",
                     "checkpoint.async_save=true"))
    assert losses(tmp_path / "a") == losses(straight)
    for step in (2, 4, 6):
        name = f"step_{step:08d}"
        verify(tmp_path / "a" / "checkpoints" / name)
        got = load_weights(tmp_path / "a" / "checkpoints" / name)[1]
        ref = load_weights(straight / "checkpoints" / name)[1]
        assert got.keys() == ref.keys()
        for key, t in ref.items():
            assert torch.equal(got[key], t), (step, key)


def test_retention_keeps_the_newest_and_the_marked(tmp_path):
    dims = type("Dims", (), {"is_main": True, "rank": 0, "world": 1, "device": torch.device("cpu")})()
    manager = CheckpointManager(CheckpointConfig(keep=2, keep_every=4), tmp_path, dims)
    for step in range(1, 10):
        manager.save(step, {"strategy": {SHARDED: {"model": {"w": torch.full((3,), float(step))}}}})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000008", "step_00000009"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000009"


def clip(tmp_path, shards, name, *extra):
    run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=",
                  "data.batch_size=32", "data.workers=0", "train.steps=2", "train.epochs=0",
                  f"log.dir={tmp_path}", f"run.name={name}", *extra])
    return tmp_path / name


def assert_open_clip_matches(folder, ours):
    """The export loads with open_clip's `local-dir:` alone, and computes what `ours` does."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    from lvmtrain.data.tokenizer import CLIPTokenizer

    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref.eval()
    assert preprocess(Image.new("L", (40, 30))).shape == (3, 28, 28)  # a grey 40x30 image: RGB, the model's size
    captions = ["a photo of a bag", "a shoe", "a coat", "a dress"]
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(captions)
    assert torch.equal(tokens, CLIPTokenizer(context_length=16)(captions))
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(images), ours.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref.encode_text(tokens), ours.encode_text(tokens), rtol=1e-4, atol=1e-5)
    assert torch.allclose(ref.logit_scale.reshape(1), ours.logit_scale)
    return ref


def test_exports_load_in_open_clip_and_safetensors(tmp_path, shards):
    from safetensors.torch import load_file

    from lvmtrain.models.registry import build_model

    run = clip(tmp_path, shards, "c")
    ours = build_model("clip_debug", image_size=28, patch_size=7, context_length=16).eval()
    plain = tmp_path / "plain.safetensors"
    run_lvmtrain(["ckpt", "export", str(run), "--out", str(plain)])
    ours.load_state_dict(load_file(plain))
    for _ in range(2):  # the second export replaces the first
        folder = run_lvmtrain(["ckpt", "export", str(run), "--format", "open_clip"]).stdout.strip()
    assert folder == str(run / "exports" / "step_00000002-open_clip")
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["step_00000002-open_clip"]
    assert sorted(p.name for p in Path(folder).iterdir()) == ["open_clip_config.json",
                                                                            "open_clip_model.safetensors"]
    assert assert_open_clip_matches(folder, ours).logit_bias is None
    inspect = run_lvmtrain(["ckpt", "inspect", str(run)]).stdout
    assert "clip_debug" in inspect and "7,768,833 parameters" in inspect and '"backend": "ddp"' in inspect


def test_siglip_exports_to_open_clip_only_with_a_class_token(tmp_path, shards):
    """The sigmoid loss's logit bias travels; siglip_* presets' image tower (mean of the patch
    tokens, no class token) has no open_clip form: refused, saying why."""
    from lvmtrain.models.registry import build_model

    run = clip(tmp_path, shards, "b", "train.task=siglip")
    ours = build_model("clip_debug", image_size=28, patch_size=7, context_length=16, init_logit_bias=0.0).eval()
    ours.load_state_dict(load_weights(run / "checkpoints" / "step_00000002")[1])
    run_lvmtrain(["ckpt", "export", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc")])
    ref = assert_open_clip_matches(tmp_path / "oc", ours)
    assert torch.allclose(ref.logit_bias.reshape(1), ours.logit_bias)

    run = clip(tmp_path, shards, "s", "model.name=siglip_debug")
    proc = run_lvmtrain(["ckpt", "export", str(run), "--format", "open_clip"], check=False)
    assert proc.returncode == 2
    assert "siglip_debug has no open_clip form" in proc.stderr and "class token" in proc.stderr, proc.stderr
    assert not (run / "exports").exists()


def test_timm_export_loads_with_timm_alone(tmp_path, straight):
    timm = pytest.importorskip("timm")
    from lvmtrain.models.registry import build_model

    ckpt = straight / "checkpoints" / "step_00000006"
    run_lvmtrain(["ckpt", "export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")])
    ref = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    ours = build_model("vit_debug", image_size=28, patch_size=7, num_classes=10, global_pool="avg").eval()
    ours.load_state_dict(load_weights(ckpt)[1])
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ref(images), ours(images), rtol=1e-4, atol=1e-5)
    data = timm.data.resolve_data_config({}, model=ref)
    assert data["input_size"] == (3, 28, 28) and data["mean"] == [0.5] * 3 and data["crop_pct"] == 1.0

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    proc = run_lvmtrain(["ckpt", "export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "notes")],
                        check=False)
    assert proc.returncode == 2 and "is not an export of this format" in proc.stderr, proc.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"  # refused, nothing deleted


def test_failed_background_save_surfaces_at_the_next_step(tmp_path):
    dims = type("Dims", (), {"is_main": True, "rank": 0, "world": 1, "device": torch.device("cpu")})()
    manager = CheckpointManager(CheckpointConfig(async_save=True), tmp_path, dims)
    manager.save(1, {"strategy": {SHARDED: {"model": {"w": torch.ones(3)}}},
                     "bad": lambda: None})  # a lambda cannot be pickled: the write fails in the background
    with pytest.raises(CheckpointError, match="background checkpoint save failed"):
        for _ in range(100):
            manager.check()
            time.sleep(0.05)
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()  # and it never became a checkpoint


def test_named_parts_each_get_their_own_sharded_state_back(tmp_path):
    """The manager knows no part's layout: any part's `SHARDED` tensors go through DCP and come
    back into that part's template (a teacher model of a future task, say), its other state and
    plain counters through state.pt; two parts may not claim one sharded key."""
    dims = type("Dims", (), {"is_main": True, "rank": 0, "world": 1, "device": torch.device("cpu")})()
    manager = CheckpointManager(CheckpointConfig(), tmp_path, dims)
    state = {"strategy": {SHARDED: {"model": {"w": torch.arange(3.0)}}, "scheduler": {"n": 4}},
             "task": {SHARDED: {"teacher": {"w": torch.full((2,), 7.0)}}, "momentum": 0.996}, "step": 5}
    path = manager.save(5, state)
    templates = {"strategy": {SHARDED: {"model": {"w": torch.zeros(3)}}},
                 "task": {SHARDED: {"teacher": {"w": torch.zeros(2)}}}}
    got = manager.load(path, templates)
    assert torch.equal(got["strategy"][SHARDED]["model"]["w"], torch.arange(3.0)) and got["strategy"]["scheduler"] == {"n": 4}
    assert torch.equal(got["task"][SHARDED]["teacher"]["w"], torch.full((2,), 7.0)) and got["task"]["momentum"] == 0.996
    assert got["step"] == 5 and "model" not in got["task"][SHARDED]
    with pytest.raises(ValueError, match=r"part 'task' reuses the sharded keys \['model'\]"):
        manager.save(6, {**state, "task": {SHARDED: {"model": {"v": torch.ones(1)}}}})
