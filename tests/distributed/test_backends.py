"""Every data-parallel backend on 2 gloo ranks trains like one process on the same global batch:
the same loss at every step and the same final weights (issue: distributed engines)."""

import importlib.util

import pytest
import torch

from lvmtrain.export import load_weights
from tests.conftest import read_metrics, run_lvmtrain

STEPS = 10
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is an extra: pip install 'lvmtrain[deepspeed]' (make test does)")
CLIP = ["configs/debug/clip.yaml", "data.val=", "log.every=1", "data.workers=1", "optim.warmup_steps=3"]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def final_weights(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_weights(ckpt)[1]


def assert_same_run(ref_dir, run_dir, rtol):
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(ref) and len(ref) >= 3, (sorted(ref), sorted(got))
    for step in ref:
        assert abs(got[step] - ref[step]) <= rtol * abs(ref[step]), (step, ref[step], got[step])
    assert_same_weights(final_weights(ref_dir), final_weights(run_dir), rtol)
    assert ref[max(ref)] < ref[1] - 0.02  # it trained: not a comparison of two flat lines


def assert_same_weights(a, b, rtol):
    """Relative difference of all weights together. NOTE: not per tensor: some gradients are
    rounding noise by construction (attention's key bias cancels in the softmax), and Adam turns
    noise of any size into steps of about the learning rate, so such tensors differ between any
    two summation orders."""
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].shape == a[name].shape, name
    diff = torch.cat([(b[n].float() - a[n].float()).flatten() for n in a])
    ref = torch.cat([a[n].float().flatten() for n in a])
    worst = max(a, key=lambda n: (b[n].float() - a[n].float()).norm() / a[n].float().norm().clamp(min=1e-12))
    assert diff.norm() <= rtol * ref.norm(), (diff.norm() / ref.norm(), f"worst tensor: {worst}")


def train(shards, tmp_path, name, *overrides, nproc=1, steps=STEPS):
    run_lvmtrain(["train", *CLIP, f"data.train={shards['train']}", f"train.steps={steps}", "train.epochs=0",
                  f"log.dir={tmp_path}", f"run.name={name}", *overrides], nproc=nproc)
    return tmp_path / name


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One process, global batch 32, fp32."""
    return train(shards, tmp_path_factory.mktemp("ref"), "ref", "data.batch_size=32")


@pytest.mark.parametrize("backend", [
    ["parallel.backend=ddp"],
    ["parallel.backend=fsdp"],
    ["parallel.backend=fsdp", "parallel.reshard_after_forward=false"],
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=1"], marks=needs_deepspeed),
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=2"], marks=needs_deepspeed),
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=3"], marks=needs_deepspeed),
], ids=["ddp", "fsdp-full-shard", "fsdp-shard-grad-op", "zero1", "zero2", "zero3"])
def test_backend_matches_one_process_fp32(shards, tmp_path, reference, backend):
    run = train(shards, tmp_path, "two", "data.batch_size=16", *backend, nproc=2)
    assert_same_run(reference, run, rtol=1e-4)


@pytest.mark.parametrize("backend", [
    ["parallel.backend=ddp"],
    ["parallel.backend=fsdp"],
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=2"], marks=needs_deepspeed),
], ids=["ddp", "fsdp", "zero2"])
def test_accumulation_under_backend_matches_one_process(shards, tmp_path, reference, backend):
    """2 ranks x 2 micro-batches of 8 = the reference's 32, CLIP's loss over the whole 32."""
    run = train(shards, tmp_path, "accum", "data.batch_size=8", "train.grad_accum_steps=2", *backend, nproc=2)
    assert_same_run(reference, run, rtol=1e-4)


@pytest.mark.parametrize("config", ["configs/debug/clip.yaml", "configs/debug/vit.yaml"])
def test_accumulation_4x8_matches_batch_32(shards, tmp_path, config):
    common = [config, "data.val=", "log.every=1", "data.workers=0", "optim.warmup_steps=3", "train.deterministic=true"]
    for name, batch, accum in (("b32", 32, 1), ("a4x8", 8, 4)):
        run_lvmtrain(["train", *common, f"data.train={shards['train']}", "train.steps=10", "train.epochs=0",
                      f"log.dir={tmp_path}", f"run.name={name}", f"data.batch_size={batch}",
                      f"train.grad_accum_steps={accum}"])
    assert_same_run(tmp_path / "b32", tmp_path / "a4x8", rtol=1e-4)


@needs_deepspeed
def test_bf16_backends_match_one_process(shards, tmp_path):
    """bf16 autocast (bf16 weights under ZeRO and FSDP's mixed-precision policy): within 2e-2.
    Few, small steps: this CPU has no bf16 units."""
    small = ["data.batch_size=8", "train.precision=bf16", "model.context_length=8"]
    ref = train(shards, tmp_path, "ref", *small[1:], "data.batch_size=16", steps=4)
    for name, backend in (("fsdp", ["parallel.backend=fsdp"]),
                          ("zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"])):
        run = train(shards, tmp_path, name, *small, *backend, nproc=2, steps=4)
        ref_l, got = losses(ref), losses(run)
        assert sorted(got) == sorted(ref_l)
        for step in ref_l:
            assert abs(got[step] - ref_l[step]) <= 2e-2 * abs(ref_l[step]), (name, step, ref_l[step], got[step])
        assert_same_weights(final_weights(ref), final_weights(run), 2e-2)


@pytest.mark.parametrize("backend", [
    ["parallel.backend=fsdp"],
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=3"], marks=needs_deepspeed),
], ids=["fsdp", "zero3"])
def test_meta_init_builds_sharded_and_trains(shards, tmp_path, backend):
    """parallel.meta_init: FSDP2 from the meta device, ZeRO-3 inside zero.Init; then it learns."""
    run = train(shards, tmp_path, "meta", "data.batch_size=16", "parallel.meta_init=true", *backend, nproc=2)
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.02


@needs_deepspeed
def test_checkpoint_moves_between_backends(shards, tmp_path):
    """One run, resumed under another backend and world size each time (ZeRO-2 on 2 ranks -> FSDP2
    on 3 -> ZeRO-3 on 2 -> DDP on 1 -> ZeRO-2 on 3), follows the uninterrupted single-process run
    step for step: weights, Adam moments, schedule, data position. ZeRO writes and reads only
    its partitions' ranges of each parameter; DDP and FSDP2 read them whole or as their shards."""
    constant = ["optim.schedule=constant", "checkpoint.every=2"]
    ref = train(shards, tmp_path / "ref", "ref", "data.batch_size=48", *constant)
    zero2, zero3 = (["parallel.backend=deepspeed", f"parallel.zero_stage={k}"] for k in (2, 3))
    chain = [(2, 2, zero2), (4, 3, ["parallel.backend=fsdp"]), (6, 2, zero3), (8, 1, ["parallel.backend=ddp"]),
             (10, 3, zero2)]
    for steps, ranks, backend in chain:
        run = train(shards, tmp_path, "chain", f"data.batch_size={48 // ranks}", *constant, *backend,
                    nproc=ranks, steps=steps)
    assert_same_run(ref, run, rtol=1e-4)


@pytest.fixture(scope="module")
def siglip_reference(shards, tmp_path_factory):
    """One process, global batch 32, fp32, SigLIP's sigmoid loss."""
    return train(shards, tmp_path_factory.mktemp("siglip_ref"), "ref", "data.batch_size=32", "train.task=siglip")


@pytest.mark.parametrize("backend", [
    ["parallel.backend=ddp"],
    ["parallel.backend=fsdp"],
    pytest.param(["parallel.backend=deepspeed", "parallel.zero_stage=2"], marks=needs_deepspeed),
], ids=["ddp", "fsdp", "zero2"])
def test_siglip_ring_with_accumulation_matches_one_process(shards, tmp_path, siglip_reference, backend):
    """2 ranks x 2 micro-batches of 8: the ring loss (texts passed between ranks) through the
    gradient cache equals one process's loss over the whole 32, under each kind of backend."""
    run = train(shards, tmp_path, "accum", "data.batch_size=8", "train.grad_accum_steps=2", "train.task=siglip",
                *backend, nproc=2)
    assert_same_run(siglip_reference, run, rtol=1e-4)
