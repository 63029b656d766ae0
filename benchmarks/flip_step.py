"""FLIP patch dropout: the training step's time with and without it, side by side in one process.

    python benchmarks/flip_step.py [--model clip_debug --image 28 --patch 4 --batch 128 --steps 20]

The demo CLIP (`configs/debug/clip.yaml`'s shapes; `--patch 4` is the preset's own, 49 patches,
`--patch 7` the demo config's 16) is trained through lvmtrain's Strategy and ClipTask (fp32,
AdamW, forward + backward + optimizer step) on random images and captions. Steps alternate
between patch dropout on and off (`unmask_patches_from`'s switch), so a slow spell of the machine
hits both alike; after warm-up the medians are compared, with the analytic FLOPs ratio
(`flops_per_sample`) beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="clip_debug")
    p.add_argument("--image", type=int, default=28)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    import torch

    from lvmtrain.config.schema import OptimConfig, ParallelConfig
    from lvmtrain.data.batch import Batch
    from lvmtrain.distributed.dims import Dims
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.registry import build_model
    from lvmtrain.models.vit import PatchDropout
    from lvmtrain.tasks.contrastive import ClipTask

    torch.manual_seed(0)
    dims = Dims(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    strategy = build_strategy(ParallelConfig(), dims, "fp32")
    model = build_model(args.model, image_size=args.image, patch_size=args.patch, context_length=args.context,
                        patch_dropout=args.dropout)
    strategy.setup(model, OptimConfig(), total_steps=10_000)
    task = ClipTask(tokenizer=None)
    dropouts = [m for m in model.modules() if isinstance(m, PatchDropout)]
    masked_keep = [m.keep for m in dropouts]
    flops = {}

    def use(masked: bool) -> None:
        for m, keep in zip(dropouts, masked_keep):
            m.keep = keep if masked else m.num_patches
        flops[masked] = model.flops_per_sample()

    batch = Batch(image=torch.randn(args.batch, 3, args.image, args.image), keys=[], shards=[],
                  text=torch.randint(1, 1000, (args.batch, args.context)))
    times = {True: [], False: []}
    for i in range(2 * (args.warmup + args.steps)):
        masked = i % 2 == 0
        use(masked)
        t = time.perf_counter()
        task.train_step(strategy, [batch])
        strategy.step()
        if i >= 2 * args.warmup:
            times[masked].append(time.perf_counter() - t)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    kept = masked_keep[0] if masked_keep else 0
    print(f"{args.model} {args.image}px patch {args.patch}: {dropouts[0].num_patches if dropouts else 0} patches, "
          f"{kept} kept with patch_dropout={args.dropout}; batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"step without dropout  {off * 1e3:8.1f} ms (median of {args.steps})")
    print(f"step with dropout     {on * 1e3:8.1f} ms")
    print(f"ratio                 {on / off:8.2f}x   (analytic FLOPs {flops[True] / flops[False]:.2f}x)")


if __name__ == "__main__":
    main()
