"""DeepSpeed in bf16 on a CUDA device: the engine must not switch off the forward's autocast.

DeepSpeed 0.19's `engine.forward` runs the module under `torch.autocast(enabled=False)` whenever
`torch.is_autocast_enabled()` (which asks about CUDA) is true and its config has no enabled
`torch_autocast` section: bf16 weights then met fp32 images on the first step of every GPU run
(issue: GPU). CPU autocast is invisible to that check, so a plain CPU run cannot show it. Here a
CPU process raises the CUDA autocast flag around the step, as a CUDA trainer's autocast does, and
the engine's own check decides as it would on a GPU; the rest of the step is real (gloo, ZeRO).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is an extra: pip install 'lvmtrain[deepspeed]' (make test does)")

CASES = {
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "zero2-offload": dict(zero_stage=2, offload_optimizer=True),
    "zero3-meta-offload": dict(zero_stage=3, meta_init=True, offload_optimizer=True, offload_params=True),
}


def two_steps(backend: str, parallel: dict, *, cuda_autocast: bool) -> dict:
    """Two bf16 optimizer steps of the debug CLIP on one fixed batch, through the `Strategy`
    exactly as the trainer drives it; the losses and the dtype the first Linear computed in."""
    from lvmtrain.config.schema import OptimConfig, ParallelConfig
    from lvmtrain.distributed.dims import Dims
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.registry import build_model
    from lvmtrain.data.batch import Batch
    from lvmtrain.tasks import ClipTask

    dims = Dims(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    strategy = build_strategy(ParallelConfig(backend=backend, **parallel), dims, "bf16")
    torch.manual_seed(0)
    with strategy.init_context():
        model = build_model("clip_debug", context_length=16)
    strategy.setup(model, OptimConfig(lr=1e-3, warmup_steps=0), 2, micro_batch=8, accum=1)
    seen = []
    linear = next(m for m in strategy.unwrapped().modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, args, out: seen.append(str(out.dtype)))
    g = torch.Generator().manual_seed(1)
    batch = Batch(image=torch.randn(8, 3, 32, 32, generator=g), keys=[], shards=[],
                  text=torch.randint(1, 49407, (8, 16), generator=g))
    task, losses = ClipTask(None), []
    previous = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", cuda_autocast)  # what torch.autocast("cuda") sets
    try:
        for _ in range(2):
            with strategy.micro_step(sync_grads=True):
                out = task(strategy.model, batch)
                strategy.backward(out["loss"])
            strategy.step()
            losses.append(out["loss"].item())
    finally:
        torch.set_autocast_enabled("cuda", previous)
    return {"losses": losses, "linear_dtype": seen[0]}


def meta_init_blocks() -> dict:
    """The debug ViT built under ZeRO-3's zero.Init (parallel.meta_init): how its blocks' Linear
    layers came out, gathered whole."""
    import deepspeed

    from lvmtrain.config.schema import OptimConfig, ParallelConfig
    from lvmtrain.distributed.dims import Dims
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.registry import build_model

    dims = Dims(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    strategy = build_strategy(ParallelConfig(backend="deepspeed", zero_stage=3, meta_init=True), dims, "fp32")
    with strategy.init_context():
        model = build_model("vit_debug")
    strategy.setup(model, OptimConfig(lr=1e-3, warmup_steps=0), 2, micro_batch=8, accum=1)
    linears = [m for m in strategy.unwrapped().blocks.modules() if isinstance(m, torch.nn.Linear)]
    params = [p for m in linears for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(params):
        weights = torch.cat([m.weight.flatten() for m in linears])
        biases = torch.cat([m.bias.flatten() for m in linears])
        return {"weight_std": weights.std().item(), "bias_max": biases.abs().max().item()}


def main(names: list[str]) -> None:
    from lvmtrain.distributed.dims import Dims
    from lvmtrain.distributed.strategy import ensure_process_group

    ensure_process_group(Dims(0, 1, 0, 1, torch.device("cpu")))
    if names == ["vit-meta"]:
        print(json.dumps(meta_init_blocks()))
        return
    out = {"ddp": two_steps("ddp", {}, cuda_autocast=False)}
    for name in names:
        out[name] = two_steps("deepspeed", CASES[name], cuda_autocast=True)
    print(json.dumps(out))


def test_zero_bf16_forward_keeps_autocast_when_cuda_autocast_is_on():
    """Every ZeRO stage, with and without offload and meta_init: the step runs, the forward's
    matmuls run in bf16 (autocast is on inside the engine), and the losses equal DDP's bf16
    losses on the same batch within bf16 rounding."""
    proc = subprocess.run([sys.executable, __file__, *CASES], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ddp = result.pop("ddp")
    assert ddp["linear_dtype"] == "torch.bfloat16"
    for name, got in result.items():
        assert got["linear_dtype"] == "torch.bfloat16", name
        # meta_init draws other initial weights (zero.Init partitions the random streams)
        if "meta" not in name:
            for a, b in zip(got["losses"], ddp["losses"]):
                assert abs(a - b) <= 2e-2 * abs(b), (name, got["losses"], ddp["losses"])
        assert all(torch.isfinite(torch.tensor(got["losses"]))), name


def test_zero3_meta_init_initialises_like_the_preset():
    """ViT under ZeRO-3 with parallel.meta_init: it builds (the patch embedding's init needs no
    weight shape), and its blocks get the preset's timm init (normal, std 0.02; zero biases), not
    nn.Linear's defaults left by zero.Init's early partitioning."""
    proc = subprocess.run([sys.executable, __file__, "vit-meta"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bias_max"] == 0.0, got
    assert 0.018 < got["weight_std"] < 0.022, got  # nn.Linear's defaults here: ~0.04


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
