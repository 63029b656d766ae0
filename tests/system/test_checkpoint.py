"""Checkpoints: atomic under kill -9 at any point of a save, verified on load, async, exported."""

import shutil
import time

import pytest
import torch

from lvmtrain.checkpoint import SHARDED, CheckpointError, CheckpointManager, verify
from lvmtrain.config.schema import CheckpointConfig
from lvmtrain.export import load_weights
from tests.conftest import OPEN_CLIP_DEBUG_CFG, read_metrics, run_lvmtrain


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


def test_exports_load_in_open_clip_and_safetensors(tmp_path, shards):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    from lvmtrain.data.tokenizer import CLIPTokenizer
    from lvmtrain.models.registry import build_model

    run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=",
                  "data.batch_size=32", "data.workers=0", "train.steps=2", "train.epochs=0",
                  f"log.dir={tmp_path}", "run.name=c"])
    ours = build_model("clip_debug", image_size=28, patch_size=7, context_length=16).eval()
    plain = tmp_path / "plain.safetensors"
    run_lvmtrain(["ckpt", "export", str(tmp_path / "c"), "--out", str(plain)])
    ours.load_state_dict(load_file(plain))
    oc_file = tmp_path / "oc.safetensors"
    run_lvmtrain(["ckpt", "export", str(tmp_path / "c"), "--format", "open_clip", "--out", str(oc_file)])
    cfg = {**OPEN_CLIP_DEBUG_CFG, "vision_cfg": {**OPEN_CLIP_DEBUG_CFG["vision_cfg"], "image_size": 28, "patch_size": 7},
           "text_cfg": {**OPEN_CLIP_DEBUG_CFG["text_cfg"], "context_length": 16}}
    ref = open_clip.CLIP(**cfg).eval()
    ref.load_state_dict(load_file(oc_file), strict=False)  # attn_mask is a buffer open_clip rebuilds
    images = torch.randn(4, 3, 28, 28)
    tokens = CLIPTokenizer(context_length=16)(["a photo of a bag", "a shoe", "a coat", "a dress"])
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(images), ours.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref.encode_text(tokens), ours.encode_text(tokens), rtol=1e-4, atol=1e-5)
        assert torch.allclose(ref.logit_scale.reshape(1), ours.logit_scale)
    inspect = run_lvmtrain(["ckpt", "inspect", str(tmp_path / "c")]).stdout
    assert "clip_debug" in inspect and "7,768,833 parameters" in inspect and '"backend": "ddp"' in inspect


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
