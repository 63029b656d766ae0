"""Bytes of parameters, gradients and optimizer state each rank holds, per backend, vs the ZeRO paper.

    python benchmarks/memory_per_rank.py [--model vit_b16 --ranks 2]

For each backend this starts `torchrun --nproc_per_node=RANKS` on this script's worker, which
builds the model through lvmtrain's Strategy in bf16 mixed precision, takes one optimizer step
(so Adam's state exists), runs the next forward + backward (so gradients exist) and then counts
every tensor storage alive in the process (found by the garbage collector, deduplicated by
storage, DTensors by their local shard) that was not there before the model was built. That is
measured, not computed from the formulas it is compared with:
    DDP 16 psi, ZeRO-1 4 psi + 12 psi/N, ZeRO-2 2 psi + 14 psi/N, ZeRO-3 and FSDP2 16 psi/N
(psi = parameter count; 2-byte weights and gradients, 12 bytes of fp32 master weight + Adam
moments; DDP and FSDP2 keep fp32 weights and gradients under autocast: the same 16 bytes).
Inputs are 32 px images (4 patches) so that the model states, not activations, are measured.
"""

from __future__ import annotations

import argparse
import gc
import json

from _torchrun import run_worker

BACKENDS = {
    "ddp": ({"backend": "ddp"}, lambda n: 16.0),
    "zero1": ({"backend": "deepspeed", "zero_stage": 1}, lambda n: 4 + 12 / n),
    "zero2": ({"backend": "deepspeed", "zero_stage": 2}, lambda n: 2 + 14 / n),
    "zero3": ({"backend": "deepspeed", "zero_stage": 3}, lambda n: 16 / n),
    "fsdp2": ({"backend": "fsdp"}, lambda n: 16 / n),
}


def live_storages() -> dict[int, int]:
    """{storage address: bytes} of every tensor the garbage collector can reach."""
    import torch
    from torch.distributed.tensor import DTensor

    out = {}
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    # NOTE: a .grad is not tracked by the collector on its own: reach it through its tensor.
    tensors += [t.grad for t in tensors if t.grad is not None]
    for obj in tensors:
        t = obj._local_tensor if isinstance(obj, DTensor) else obj
        if t.device.type == "meta":
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def worker(name: str, model_name: str) -> None:
    import torch

    from lvmtrain.config.schema import OptimConfig, ParallelConfig
    from lvmtrain.distributed.dims import init_distributed
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.registry import build_model

    parallel = ParallelConfig(**BACKENDS[name][0], bucket_mb=4)
    dims = init_distributed(parallel)
    strategy = build_strategy(parallel, dims, "bf16")
    gc.collect()
    before = set(live_storages())
    torch.manual_seed(0)
    with strategy.init_context():
        model = build_model(model_name, image_size=32, num_classes=10)
    psi = sum(p.numel() for p in model.parameters())
    strategy.setup(model, OptimConfig(warmup_steps=1), total_steps=10, micro_batch=2, accum=1)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def forward_backward():
        with strategy.micro_step(sync_grads=True):
            loss = torch.nn.functional.cross_entropy(strategy.model(images).float(), labels)
            strategy.backward(loss)

    forward_backward()
    strategy.step()
    forward_backward()  # gradients held, as between backward and the optimizer step
    gc.collect()
    held = sum(size for ptr, size in live_storages().items() if ptr not in before)
    if dims.rank == 0:
        print(json.dumps({"backend": name, "psi": psi, "bytes": held, "world": dims.world}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.model)
    print(f"{args.model}, {args.ranks} ranks, bf16 mixed precision, bytes per parameter held by rank 0:")
    print(f"{'backend':8} {'measured':>10} {'theory':>8} {'ratio':>6} {'GB/rank':>8}")
    for name in args.backends.split(","):
        r = run_worker(__file__, args.ranks, [name, "--model", args.model])
        if r is not None:
            measured, theory = r["bytes"] / r["psi"], BACKENDS[name][1](r["world"])
            print(f"{name:8} {measured:10.2f} {theory:8.2f} {measured / theory:6.2f} {r['bytes'] / 1e9:8.2f}")

if __name__ == "__main__":
    main()
