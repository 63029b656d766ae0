"""Training-step time of our CLIP vs open_clip's, same shapes, same batch, same process; and MFU
against the device's peak.

    python benchmarks/step_vs_open_clip.py [--model clip_debug --image-size 28 --context 16 --batch 128 --steps 10]
    python benchmarks/step_vs_open_clip.py --device cuda --model clip_b16 --batch 256 --precision bf16 --json

Both models take the same synthetic tensors, torch's AdamW and the trainer's autocast. A preset
open_clip names (clip_b32 ... clip_h14, context 77) is compared with `open_clip.create_model`;
any other (clip_debug) with open_clip's `CLIP` of the same shapes. The step is timed after
warm-up with the device synchronised at both ends. Prints the ours/open_clip step-time ratio
(< 1: ours is faster), each model's achieved FLOP/s from `flops_per_sample()`, and the peak
(CPU: a matmul measured here; CUDA: measured, and the datasheet figure the trainer's MFU uses).
`--json` prints one JSON line per measurement instead (benchmarks/gpu_check.py reads them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch
import torch.nn.functional as F

from lvmtrain.metrics import gpu_peak_tflops, measure_matmul_flops
from lvmtrain.models.registry import build_model, get_preset
from lvmtrain.tasks.contrastive import clip_loss

OPEN_CLIP_NAMES = {"clip_b32": "ViT-B-32", "clip_b16": "ViT-B-16", "clip_l14": "ViT-L-14", "clip_h14": "ViT-H-14"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, cuda: bool, warm: int, steps: int) -> float:
    """Seconds per call of `fn` after `warm` calls; on a GPU device time, whatever the host ran ahead."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def peak_flops(dev: torch.device, precision: str) -> dict[str, float]:
    """{"measured": FLOP/s of a square matmul here, "datasheet": the GPU's table figure if known}."""
    dtype = DTYPES.get(precision, torch.float32)
    if dev.type != "cuda":
        return {"measured": measure_matmul_flops(dtype)}
    a, b = (torch.randn(8192, 8192, device=dev, dtype=dtype) for _ in range(2))
    peak = {"measured": 2 * 8192**3 / timed(lambda: a @ b, True, warm=3, steps=20)}
    if known := gpu_peak_tflops(torch.cuda.get_device_name(), precision):
        peak["datasheet"] = known[1] * 1e12  # what the trainer's MFU divides by
    return peak


def open_clip_twin(name: str, ours: torch.nn.Module):
    """open_clip's model of the same preset (by name where it has one), else its CLIP of the same shapes."""
    import open_clip

    size, ctx, pre = ours.image_size, ours.context_length, get_preset(name)
    if name in OPEN_CLIP_NAMES and ctx == 77:
        return open_clip.create_model(OPEN_CLIP_NAMES[name], force_image_size=size)
    vis, txt = pre.vision, pre.text
    return open_clip.CLIP(pre.embed_dim, vision_cfg=dict(
        image_size=size, patch_size=ours.visual.patch_embed.patch_size, width=vis.width, layers=vis.depth,
        head_width=vis.width // vis.num_heads), text_cfg=dict(
        context_length=ctx, vocab_size=txt.vocab_size, width=txt.width, heads=txt.num_heads, layers=txt.depth))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="clip_debug")
    p.add_argument("--image-size", type=int, default=None, help="default: 28 for clip_debug, else the preset's")
    p.add_argument("--context", type=int, default=None, help="default: 16 for clip_debug, else 77")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--json", action="store_true", help="one JSON line per measurement")
    args = p.parse_args()
    debug = args.model == "clip_debug"
    dev, dtype, cuda = torch.device(args.device), DTYPES.get(args.precision), args.device == "cuda"
    torch.manual_seed(0)
    ours = build_model(args.model, image_size=args.image_size or (28 if debug else None),
                       context_length=args.context or (16 if debug else None)).to(dev)
    peak = peak_flops(dev, args.precision)
    if args.json:
        print(json.dumps({"peak_tflops": {k: v / 1e12 for k, v in peak.items()}}), flush=True)
    batch, size, ctx = args.batch, ours.image_size, ours.context_length
    images = torch.randn(batch, 3, size, size, device=dev)
    tokens = torch.randint(1, 49406, (batch, ctx), device=dev)
    tokens[:, -1], labels = 49407, torch.arange(batch, device=dev)

    def our_loss(model):
        out = model(images, tokens)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def their_loss(model):
        img, txt, scale = model(images, tokens)
        logits = scale * img @ txt.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    models = [("step_ours", lambda: ours, our_loss)]
    if importlib.util.find_spec("open_clip") is None:
        print(json.dumps({"case": "step_open_clip", "status": "skipped: open_clip not installed"}), flush=True)
    else:
        models.append(("step_open_clip", lambda: open_clip_twin(args.model, ours), their_loss))
    results = {}
    for name, build, loss_fn in models:
        model = build().to(dev)
        opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-5 if cuda else 1e-4), []

        def step():
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_s = timed(step, cuda, warm=5 if cuda else 2, steps=args.steps)
        results[name] = {"case": name, "status": "ok", "step_s": step_s, "samples_per_s": batch / step_s,
                         "mfu": ours.flops_per_sample() * batch / step_s / peak.get("datasheet", peak["measured"]),
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                         "last_loss": losses[-1].item(), "params": sum(q.numel() for q in model.parameters())}
        if args.json:
            print(json.dumps(results[name]), flush=True)
        model.cpu()  # the next model's peak memory is its own
    if args.json or len(results) < 2:
        return
    mine, theirs = results["step_ours"], results["step_open_clip"]
    flops = ours.flops_per_sample() * batch
    print(f"threads {torch.get_num_threads()}, device {args.device}, batch {batch}, image {size}, context {ctx}")
    print(f"step time: ours {mine['step_s'] * 1e3:.1f} ms, open_clip {theirs['step_s'] * 1e3:.1f} ms, "
          f"ratio ours/open_clip {mine['step_s'] / theirs['step_s']:.3f}")
    print(f"achieved: ours {flops / mine['step_s'] / 1e9:.1f} GFLOP/s, open_clip {flops / theirs['step_s'] / 1e9:.1f} "
          f"GFLOP/s; peak matmul {peak['measured'] / 1e9:.1f} GFLOP/s; MFU ours {mine['mfu']:.1%}, "
          f"open_clip {theirs['mfu']:.1%}")


if __name__ == "__main__":
    main()
