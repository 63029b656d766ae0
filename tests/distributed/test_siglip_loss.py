"""The ring SigLIP loss equals the all-gather one, and both equal one process on the global batch.

What equals what, for a global batch of N = n * world pairs split into rank shards of n:
- per rank, ring == gathered: the loss_r and the gradients of the rank's features, of the
  temperature's parameter and of the bias, for any per-rank weight on loss_r;
- mean over ranks of loss_r == the one-process loss on all N pairs normalised by N (open_clip
  normalises by the batch a process holds: n on a rank, N on one process);
- a rank's feature gradients / world == the one-process gradients of its shard (the text gradient
  sums every rank's loss, as all_gather's backward does), and the mean over ranks of the
  temperature and bias gradients == the one-process ones: what DDP's averaging gives;
- the ring keeps only its inputs for backward.
"Equal" is within 1e-6 in float32 and 1e-12 in float64, absolute plus relative.
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lvmtrain.tasks.siglip_loss import siglip_loss_gathered, siglip_loss_ring
from tests.conftest import spawn_ranks

N_LOCAL, DIM = 8, 16
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def one_process_loss(images, texts, logit_scale, logit_bias):
    """SigLIP on one process, written out independently: N x N pairs, normalised by N."""
    logits = logit_scale * images @ texts.T + logit_bias
    labels = 2 * torch.eye(len(images), dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(images)


def global_batch(world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    images = F.normalize(torch.randn(N_LOCAL * world, DIM, generator=g, dtype=dtype), dim=-1)
    texts = F.normalize(torch.randn(N_LOCAL * world, DIM, generator=g, dtype=dtype), dim=-1)
    return images, texts


def loss_and_grads(loss_fn, images, texts, weight=1.0) -> dict[str, torch.Tensor]:
    """The loss and the gradients of (weight * loss), with the temperature as exp(parameter) and
    SigLIP's initial t = 10, b = -10, both shape (1,) as upstream."""
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    log_scale = torch.tensor([math.log(10.0)], dtype=images.dtype, requires_grad=True)
    bias = torch.tensor([-10.0], dtype=images.dtype, requires_grad=True)
    loss = loss_fn(images, texts, log_scale.exp(), bias)
    (weight * loss).backward()
    return {"loss": loss.detach(), "images": images.grad, "texts": texts.grad, "log_scale": log_scale.grad,
            "bias": bias.grad}


def mismatches(got: dict, want: dict, tol: float, what: str) -> list[str]:
    """Keys where |got - want| > tol + tol * |want| somewhere."""
    out = []
    for key in want:
        err = ((got[key] - want[key]).abs() - tol * want[key].abs()).max().item()
        if not err <= tol:
            out.append(f"{what} {key}: off by {err:.3g} beyond tolerance {tol:g}")
    return out


def saved_bytes(loss_fn, images, texts) -> int:
    """Bytes the loss keeps for backward (the scale and bias passed as leaves)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    args = (images.requires_grad_(), texts.requires_grad_(), torch.ones(1, requires_grad=True),
            torch.zeros(1, requires_grad=True))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(*args)
    return total


def check_rank(rank: int, world: int) -> list[str]:
    """Every comparison of the module docstring on this rank; what failed, as messages."""
    errors = []
    shard = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for dtype, tol in TOLERANCE.items():
        images, texts = global_batch(world, dtype)
        local = (images[shard], texts[shard])
        ring = loss_and_grads(siglip_loss_ring, *local)
        errors += mismatches(ring, loss_and_grads(siglip_loss_gathered, *local), tol, f"{dtype} ring vs gathered")
        # a different weight on every rank's loss: each rank's gradient must honour every rank's weight
        weight = float(rank + 1)
        errors += mismatches(loss_and_grads(siglip_loss_ring, *local, weight),
                             loss_and_grads(siglip_loss_gathered, *local, weight), tol,
                             f"{dtype} weighted ring vs gathered")
        ref = loss_and_grads(one_process_loss, images, texts)
        as_ddp = dict(ring, images=ring["images"] / world, texts=ring["texts"] / world)
        for key in ("loss", "log_scale", "bias"):
            dist.all_reduce(as_ddp[key])
            as_ddp[key] /= world
        errors += mismatches(as_ddp, dict(ref, images=ref["images"][shard], texts=ref["texts"][shard]), tol,
                             f"{dtype} ring vs one process")
    local = tuple(t[shard] for t in global_batch(world, torch.float32))
    inputs, saved = sum(t.numel() * 4 for t in local) + 8, saved_bytes(siglip_loss_ring, *local)
    if saved != inputs:
        errors.append(f"ring saved {saved} bytes for backward, not only its {inputs} bytes of inputs")
    return errors


def _rank(rank: int, world: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, check_rank(rank, world)))
    except Exception:  # reported to the test instead of leaving it waiting on the queue
        out.put((rank, [traceback.format_exc()]))
    finally:
        dist.destroy_process_group()


# NOTE: 2 has one neighbour on both sides; 4 is the first world whose text ring reuses a buffer.
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_gathered_and_one_process(world):
    assert spawn_ranks(_rank, world) == {r: [] for r in range(world)}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_without_process_group_both_are_the_local_loss(dtype):
    """No process group (a plain script): both reduce to the one-process loss of the local batch."""
    if dist.is_initialized():
        pytest.skip("a process group from another test is active in this process")
    images, texts = global_batch(1, dtype)
    ref = loss_and_grads(one_process_loss, images, texts)
    for fn in (siglip_loss_ring, siglip_loss_gathered):
        assert mismatches(loss_and_grads(fn, images, texts), ref, TOLERANCE[dtype], fn.__name__) == []
