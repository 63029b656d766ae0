"""Run safety of checkpoints: a full disk is named and cleaned up, a diverged state is never saved,
and `ckpt inspect | export` say (and refuse, unless asked) when they fall back to an older one."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lvmtrain.checkpoint import CheckpointError, CheckpointManager, _is_disk_full, verify
from lvmtrain.config.schema import CheckpointConfig, OptimConfig, ParallelConfig
from lvmtrain.distributed.ddp import DDPStrategy
from lvmtrain.distributed.dims import Dims
from lvmtrain.export import load_weights
from lvmtrain.models.registry import build_model
from tests.conftest import run_lvmtrain
from tests.system.test_checkpoint import vit

CPU = Dims(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))


@contextlib.contextmanager
def small_disk(path, size: str):
    """A real tmpfs of `size` mounted at `path` (root only), unmounted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def clip(log_dir, shards, steps, *extra):
    return ["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=", "data.workers=0",
            f"train.steps={steps}", "train.epochs=0", f"log.dir={log_dir}", "run.name=c", "checkpoint.every=2",
            "checkpoint.keep=10", *extra]


# A debug CLIP checkpoint (weights + Adam moments) is 94 MB: on 150 MB the step-2 one fits, step 4's does not.
@pytest.mark.parametrize("mode, nproc", [("sync", 1), ("async", 1), ("sync", 2), ("async", 2)])
def test_disk_full_during_a_save_is_named_and_leaves_the_previous_checkpoint(tmp_path, shards, mode, nproc):
    with small_disk(tmp_path / "disk", "150M") as disk:
        steps = 6 if mode == "async" else 4  # async: the failure surfaces at a later step's check
        args = clip(disk, shards, steps, f"data.batch_size={32 // nproc}", f"checkpoint.async_save={mode == 'async'}")
        proc = run_lvmtrain(args, nproc=nproc, check=False)
        assert proc.returncode != 0, proc.stdout[-2000:]
        ckpts = disk / "c" / "checkpoints"
        assert f"no space left on {disk} writing checkpoint step 4" in proc.stderr, proc.stderr[-3000:]
        assert f"The previous checkpoint {ckpts / 'step_00000002'} is intact" in proc.stderr
        assert "unexpected pos" not in proc.stderr
        assert not list((disk / "c").rglob("*.tmp")), "the partial save was left behind"
        assert shutil.disk_usage(disk).free > 50e6  # ... and its space given back
        assert (ckpts / "latest").read_text() == "step_00000002"
        assert verify(ckpts / "step_00000002")["step"] == 2
        assert not (ckpts / "step_00000004").exists()
        if mode == "sync" and nproc == 1:  # once there is room, the run resumes and finishes
            subprocess.run(["mount", "-o", "remount,size=400M", str(disk)], check=True)
            proc = run_lvmtrain(args)
            assert f"resumed from {ckpts / 'step_00000002'} at step 2" in proc.stdout
            assert (ckpts / "latest").read_text() == "step_00000004"
            verify(ckpts / "step_00000004")


def test_short_write_counts_as_disk_full_only_when_the_disk_is_full(tmp_path):
    """DCP pickles each rank's error across ranks, which drops the ENOSPC behind torch's
    "unexpected pos": then the free space decides."""
    with small_disk(tmp_path / "disk", "10M") as disk:
        with warnings.catch_warnings(), pytest.raises(dcp.CheckpointException) as caught:
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"w": torch.randn(4_000_000)}, checkpoint_id=disk / "w", no_dist=True)
        assert _is_disk_full(caught.value, disk / "w", 16_000_000)  # ENOSPC in the cause chain
        other_rank = pickle.loads(pickle.dumps(caught.value))  # what another rank receives
        assert "unexpected pos" in str(other_rank)
        assert other_rank.failures[0][0].__context__ is None
        assert _is_disk_full(other_rank, disk / "w", 16_000_000)
        assert shutil.disk_usage(tmp_path).free > 1e9
        assert not _is_disk_full(other_rank, tmp_path / "w", 16_000_000)  # a disk with room: something else


def test_a_state_with_nan_or_inf_is_never_saved(tmp_path):
    strategy = DDPStrategy(ParallelConfig(), CPU, "fp32")
    model = build_model("vit_debug", image_size=28, patch_size=7, num_classes=10)
    strategy.setup(model, OptimConfig(), total_steps=10)
    strategy.backward(strategy.model(torch.randn(4, 3, 28, 28)).logsumexp(-1).mean())
    strategy.step()  # Adam moments exist
    manager = CheckpointManager(CheckpointConfig(keep=10), tmp_path, CPU)
    ckpts = tmp_path / "checkpoints"

    def state(step):
        return {"strategy": strategy.state_dict(), "step": step}

    manager.save(1, state(1))
    verify(ckpts / "step_00000001")
    weight = dict(model.named_parameters())["blocks.1.mlp.fc1.weight"]
    moment = strategy.optimizer.state[dict(model.named_parameters())["head.bias"]]["exp_avg_sq"]
    for step, (tensor, bad, name) in enumerate([(weight, float("nan"), "model.blocks.1.mlp.fc1.weight"),
                                                (moment, float("inf"), "optim.head.bias.exp_avg_sq")], start=2):
        kept = tensor.detach().clone()
        with torch.no_grad():
            tensor.view(-1)[3] = bad
        with pytest.raises(CheckpointError, match=rf"checkpoint step {step} .*not saved: non-finite .* in {name}") as e:
            manager.save(step, state(step))
        assert f"{ckpts / 'step_00000001'} is intact" in str(e.value)
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001"]  # no .tmp either
        assert (ckpts / "latest").read_text() == "step_00000001"
        with torch.no_grad():
            tensor.copy_(kept)
    manager.save(4, state(4))  # finite again: saved
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert torch.equal(load_weights(ckpts / "step_00000004")[1]["blocks.1.mlp.fc1.weight"], weight.detach())


@pytest.fixture(scope="module")
def two_checkpoints(shards, tmp_path_factory):
    """A ViT run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("two")
    run_lvmtrain(vit(tmp, shards, "r", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5"))
    return tmp / "r"


@pytest.fixture
def damaged(two_checkpoints, tmp_path):
    """A copy of the run whose newest checkpoint has one byte flipped in a file its manifest lists."""
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    victim = run / "checkpoints" / "step_00000004" / "weights" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return run


def test_inspect_and_export_refuse_to_fall_back_quietly(damaged):
    reason = "__0_0.distcp: contents differ from the manifest's checksum"
    for verb in (["inspect"], ["export"]):
        proc = run_lvmtrain(["ckpt", *verb, str(damaged)], check=False)
        assert proc.returncode == 2, proc.stderr
        assert "step_00000004 fails verification" in proc.stderr and reason in proc.stderr
        assert "older step_00000002" in proc.stderr and "--allow-older" in proc.stderr
        assert proc.stdout == ""
    assert not (damaged / "exports").exists()  # nothing exported from the older step

    proc = run_lvmtrain(["ckpt", "inspect", str(damaged), "--allow-older"])
    assert "skipping checkpoint step_00000004" in proc.stderr and reason in proc.stderr
    assert f"using {damaged / 'checkpoints' / 'step_00000002'}" in proc.stderr
    assert proc.stdout.splitlines()[0] == str(damaged / "checkpoints" / "step_00000002")

    proc = run_lvmtrain(["ckpt", "export", str(damaged), "--allow-older"])
    assert "skipping checkpoint step_00000004" in proc.stderr and reason in proc.stderr
    out = damaged / "exports" / "step_00000002-safetensors.safetensors"
    assert proc.stdout.strip() == str(out)
    from safetensors.torch import load_file

    exported = load_file(out)
    for name, t in load_weights(damaged / "checkpoints" / "step_00000002")[1].items():
        assert torch.equal(exported[name], t), name


def test_export_writes_outside_checkpoints_by_default(two_checkpoints, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    proc = run_lvmtrain(["ckpt", "export", str(run)])
    assert proc.stdout.strip() == str(run / "exports" / "step_00000004-safetensors.safetensors")
    assert proc.stderr.count("lvmtrain:") == 0  # an intact run: nothing to warn about
    assert not list((run / "checkpoints").rglob("*.safetensors"))
    inside = run / "checkpoints" / "step_00000004" / "model.safetensors"
    proc = run_lvmtrain(["ckpt", "export", str(run), "--out", str(inside)], check=False)
    assert proc.returncode == 2 and f"inside checkpoint directory {inside.parent}" in proc.stderr
    assert not inside.exists()
    verify(run / "checkpoints" / "step_00000004")
