"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), without gathering the global batch.

Rank r scores its n images I_r against the texts T_j of every rank j:
    logits_rj = t * I_r @ T_j.T + b,   z = +1 on the diagonal of its own block (j == r), -1 elsewhere
    loss_r    = -sum_j sum log sigmoid(z * logits_rj) / n
(open_clip's normalisation: by the local batch n). The mean over ranks of loss_r is the
one-process loss on the global batch of N = n * world pairs normalised by N; each rank's text
gradient is summed over every rank's loss (as all_gather's backward does for InfoNCE in
contrastive.py), so DDP's gradient averaging yields that one-process loss's gradients.

`siglip_loss_gathered` all-gathers the texts and scores the n x N logits at once: the reference,
whose memory per rank grows with the world (N x d texts, n x N logits kept for backward).
`siglip_loss_ring` passes the text blocks around the ring instead and recomputes each block in
backward: the same value and gradients in one n x n block plus at most five n x d buffers per
rank (two on one process), whatever the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lvmtrain.tasks.contrastive import gather_with_grad

# NOTE: the text ring and the gradient ring are in flight at the same time between the same
# neighbours; gloo matches a send to a receive by tag (NCCL by issue order, the same on every rank).
_TEXT_TAG, _GRAD_TAG = 1, 2


def siglip_loss_gathered(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                         logit_bias: Tensor) -> Tensor:
    """loss_r against the all-gathered texts; `logit_scale` is the temperature t itself (exp'd)."""
    rank, _ = _rank_world()
    n = image_features.shape[0]
    logits = logit_scale * image_features @ gather_with_grad(text_features).T + logit_bias
    labels = torch.full_like(logits, -1.0)
    labels.diagonal(offset=rank * n).fill_(1.0)
    return -F.logsigmoid(labels * logits).sum() / n


def siglip_loss_ring(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     logit_bias: Tensor) -> Tensor:
    """loss_r with the texts passed around the ring of the default process group.

    The same value and gradients (features, `logit_scale` = t, `logit_bias`) as
    `siglip_loss_gathered`. Every rank must hold the same n. Not done: open_clip's bidirectional
    exchange (half the hops, two blocks in flight); chunking the n x n block for a larger n;
    skipping the gradient ring when the texts need no gradient (a frozen text tower).
    """
    return _RingSigLIP.apply(image_features, text_features.contiguous(), logit_scale, logit_bias)


class _RingSigLIP(torch.autograd.Function):
    """Forward and backward each walk the ring once; only the local inputs are saved.

    Hop k holds the text block of rank r - k. Backward recomputes that block's logits and passes
    the block's text gradient, with this rank's part added, to the right along with the block, so
    after the full cycle each rank receives its own block's gradient summed over all ranks' losses.
    """

    @staticmethod
    def forward(ctx, images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(images, texts, scale, bias)
        rank, world = _rank_world()
        total = images.new_zeros((), dtype=torch.float64)
        for hop, held in _ring(texts, rank, world):
            total += _softplus_sum(_signed_logits(images, held, scale, bias, own=hop == 0))
        return (total / images.shape[0]).to(images.dtype)

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, texts, scale, bias = ctx.saved_tensors
        rank, world = _rank_world()
        weight = grad_loss / images.shape[0]
        # NOTE: sum_j G_j @ T_j without t, so that t's gradient, sum_j <G_j, I T_j^T>, is one dot
        # product with the images at the end; G_j = d loss / d logits_rj.
        grad_images = torch.zeros_like(images)
        grad_bias = torch.zeros((), dtype=images.dtype, device=images.device)
        in_flight = None  # the previous hop's text-gradient exchange, and the gradient it sends
        for hop, held in _ring(texts, rank, world):
            g = _signed_logits(images, held, scale, bias, own=hop == 0).sigmoid_()
            if hop == 0:  # d softplus(-x) / dx = -sigmoid(-x) on the positive pairs
                g.diagonal().neg_()
            g.mul_(weight)
            grad_bias += g.sum()
            grad_images.addmm_(g, held)
            g.mul_(scale)
            if hop == 0:
                grad_texts = g.T @ images
            else:  # the held block's gradient so far, from the ranks to the left
                _wait(in_flight)
                in_flight = None  # NOTE: frees the gradient sent before the next buffer is made
                grad_texts.addmm_(g.T, images)
            del g
            if world > 1:
                received = torch.empty_like(grad_texts)
                in_flight = (_shift(grad_texts, received, rank, world, _GRAD_TAG), grad_texts)
                grad_texts = received
        if world > 1:  # this rank's own block, back from its left neighbour
            _wait(in_flight)
        grad_scale = torch.dot(images.flatten(), grad_images.flatten())
        return grad_images.mul_(scale), grad_texts, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape)


def _rank_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _ring(texts: Tensor, rank: int, world: int):
    """Yield (k, text block of rank r - k) for k = 0 .. world - 1; the next block is already in
    flight while the caller computes on the current one."""
    held, spare = texts, None
    for hop in range(world):
        last = hop == world - 1
        if not last:
            # NOTE: two buffers in turn, the next block landing in the one before the current (done
            # with by now); a fresh one per hop made three, as the caller's loop variable still
            # holds the old block while the next is allocated.
            incoming = torch.empty_like(held) if spare is None else spare
            works = _shift(held, incoming, rank, world, _TEXT_TAG)
        yield hop, held
        if not last:
            _wait((works, held))
            spare = held if hop > 0 else None  # the caller's texts are not ours to overwrite
            held = incoming


def _shift(send: Tensor, recv: Tensor, rank: int, world: int, tag: int) -> list:
    """Send `send` to rank + 1 and receive rank - 1's into `recv`, asynchronously."""
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (rank + 1) % world, tag=tag),
                                   dist.P2POp(dist.irecv, recv, (rank - 1) % world, tag=tag)])


def _wait(in_flight: tuple[list, Tensor]) -> None:
    """Wait for an exchange; the tuple also keeps the tensor being sent alive until then."""
    for work in in_flight[0]:
        work.wait()


def _signed_logits(images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor, *, own: bool) -> Tensor:
    """-z * logits of one block, in one fresh n x n buffer: its loss is sum(softplus(.))."""
    y = (images @ texts.T).mul_(scale).add_(bias)
    if own:
        y.diagonal().neg_()
    return y


def _softplus_sum(y: Tensor) -> Tensor:
    """sum(softplus(y)) in float64, overwriting y instead of allocating a second n x n block.

    NOTE: softplus(y) = relu(y) + log1p(exp(-|y|)) and sum(relu(y)) = (sum(y) + sum(|y|)) / 2.
    The two sums nearly cancel (most pairs are negatives with y well below 0), hence float64.
    """
    total = y.sum(dtype=torch.float64)
    total += y.abs_().sum(dtype=torch.float64)
    return total / 2 + y.neg_().exp_().log1p_().sum(dtype=torch.float64)
