"""Training-step time of our CLIP vs open_clip's, same shapes, same batch, same process; and MFU
against this machine's measured peak matmul rate.

    python benchmarks/step_vs_open_clip.py [--image-size 28 --context 16 --batch 128 --steps 10]

Prints: ours/open_clip step-time ratio (< 1: ours is faster), each model's achieved FLOP/s from
`flops_per_sample()`, and the peak fp32 matmul FLOP/s measured here, so MFU = achieved / peak.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lvmtrain.models.registry import build_model
from lvmtrain.tasks.contrastive import clip_loss


def peak_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def time_steps(step, steps: int) -> float:
    step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    import open_clip

    torch.manual_seed(0)
    ours = build_model("clip_debug", image_size=args.image_size, context_length=args.context)
    vis, txt = ours.visual, ours.text
    theirs = open_clip.CLIP(
        embed_dim=ours.embed_dim,
        vision_cfg=dict(image_size=args.image_size, patch_size=vis.patch_embed.patch_size, width=vis.width,
                        layers=len(vis.blocks), head_width=vis.width // vis.blocks[0].attn.num_heads),
        text_cfg=dict(context_length=args.context, vocab_size=txt.vocab_size, width=txt.width,
                      heads=txt.blocks[0].attn.num_heads, layers=len(txt.blocks)))
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    tokens = torch.randint(1, 49406, (args.batch, args.context))
    tokens[:, -1] = 49407

    def make_step(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = forward(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def our_forward(m):
        out = m(images, tokens)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    labels = torch.arange(args.batch)

    def their_forward(m):
        img, txt_f, scale = m(images, tokens)
        logits = scale * img @ txt_f.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    t_ours = time_steps(make_step(ours, our_forward), args.steps)
    t_theirs = time_steps(make_step(theirs, their_forward), args.steps)
    peak = peak_matmul_flops()
    flops = ours.flops_per_sample() * args.batch
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, image {args.image_size}, context {args.context}")
    print(f"step time: ours {t_ours * 1e3:.1f} ms, open_clip {t_theirs * 1e3:.1f} ms, ratio ours/open_clip {t_ours / t_theirs:.3f}")
    print(f"achieved: ours {flops / t_ours / 1e9:.1f} GFLOP/s, open_clip {flops / t_theirs / 1e9:.1f} GFLOP/s; "
          f"peak fp32 matmul {peak / 1e9:.1f} GFLOP/s; MFU ours {flops / t_ours / peak:.1%}, "
          f"open_clip {flops / t_theirs / peak:.1%}")


if __name__ == "__main__":
    main()
