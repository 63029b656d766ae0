"""Training step time per backend relative to DDP, and eager vs torch.compile, on this machine.

    python benchmarks/step_time.py [--model vit_ti16 --image 64 --batch 32 --ranks 2 --steps 10]

Each configuration runs under `torchrun --nproc_per_node=RANKS` through lvmtrain's Strategy
(fp32, AdamW, random inputs: the step, not the loader), discards the warm-up steps (and with
compile, the compilation), and reports the median step time over `--steps` steps. Ratios are
side by side from one run of this script; absolute times only describe this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _torchrun import run_worker

CONFIGS = {
    "ddp": {"backend": "ddp"},
    "fsdp2": {"backend": "fsdp"},
    "fsdp2-grad-op": {"backend": "fsdp", "reshard_after_forward": False},
    "zero1": {"backend": "deepspeed", "zero_stage": 1},
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
    "ddp+compile(blocks)": {"backend": "ddp", "compile": "blocks"},
    "fsdp2+compile(blocks)": {"backend": "fsdp", "compile": "blocks"},
}


def worker(name: str, args) -> None:
    import torch

    from lvmtrain.config.schema import OptimConfig, ParallelConfig
    from lvmtrain.distributed.dims import init_distributed
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.registry import build_model

    parallel = ParallelConfig(**CONFIGS[name])
    dims = init_distributed(parallel)
    strategy = build_strategy(parallel, dims, "fp32")
    torch.manual_seed(0)
    with strategy.init_context():
        model = build_model(args.model, image_size=args.image, num_classes=100)
    strategy.setup(model, OptimConfig(warmup_steps=1), total_steps=1000, micro_batch=args.batch, accum=1)
    images = torch.randn(args.batch, 3, args.image, args.image)
    labels = torch.randint(0, 100, (args.batch,))
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with strategy.micro_step(sync_grads=True):
            loss = torch.nn.functional.cross_entropy(strategy.model(images).float(), labels)
            strategy.backward(loss)
        strategy.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if dims.rank == 0:
        print(json.dumps({"name": name, "median_s": statistics.median(times)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_ti16")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)
    print(f"{args.model} at {args.image} px, batch {args.batch} per rank, {args.ranks} ranks, fp32, "
          f"median of {args.steps} steps:")
    base = None
    for name in args.configs.split(","):
        r = run_worker(__file__, args.ranks, [name, "--model", args.model, "--image", str(args.image),
                                              "--batch", str(args.batch), "--steps", str(args.steps),
                                              "--warmup", str(args.warmup)])
        if r is not None:
            base = base or r["median_s"]
            print(f"{name:24} {r['median_s'] * 1000:8.0f} ms/step   {r['median_s'] / base:5.2f}x DDP")

if __name__ == "__main__":
    main()
