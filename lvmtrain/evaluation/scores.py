"""Scores from features, as pure functions of tensors: classification counts, k-NN votes, a
linear probe, retrieval recall. Every order (ties included) is fixed by the samples' global
positions, so a sharded evaluation decides exactly as one process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_counts(logits: Tensor, labels: Tensor, classes: int, topk: int = 5) -> Tensor:
    """[classes, 3] float64: per class (by label) the samples, top-1 hits and top-k hits."""
    out = torch.zeros(classes, 3, dtype=torch.float64, device=logits.device)
    if not labels.numel():
        return out
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
    hit1 = (top[:, 0] == labels).double()
    hitk = (top == labels[:, None]).any(-1).double()
    out.index_add_(0, labels, torch.stack([torch.ones_like(hit1), hit1, hitk], 1))
    return out


def classification_scores(counts: Tensor) -> dict[str, float]:
    """top1, top5 and mean per-class recall (classes without samples left out) from `class_counts`."""
    samples, hit1, hitk = counts.sum(0).tolist()
    present = counts[:, 0] > 0
    recall = (counts[present, 1] / counts[present, 0]).mean().item() if present.any() else 0.0
    return {"top1": hit1 / max(samples, 1), "top5": hitk / max(samples, 1), "mean_per_class_recall": recall,
            "samples": int(samples)}


def merge_topk(sims: Tensor, index: Tensor, k: int, *carried: Tensor) -> tuple[Tensor, ...]:
    """The `k` largest of each row of `sims` [Q, C], with their `index` [Q, C] (and any `carried`
    tensors of the same shape), equal values ordered by index: the same neighbours whichever way
    the candidates were split."""
    order = index.argsort(dim=1, stable=True)
    sims, index, *carried = (t.gather(1, order) for t in (sims, index, *carried))
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return tuple(t.gather(1, order) for t in (sims, index, *carried))


def knn_vote(sims: Tensor, labels: Tensor, classes: int, temperature: float) -> Tensor:
    """[Q, classes] votes of the neighbours (`sims`, their `labels` [Q, k], in merge_topk's order),
    each weighted by exp(similarity / temperature) (DINO's weighted k-NN)."""
    weights = (sims / temperature).exp()
    votes = torch.zeros(sims.shape[0], classes, dtype=sims.dtype, device=sims.device)
    return votes.scatter_add_(1, labels, weights)


def fit_linear_probe(features: Tensor, labels: Tensor, classes: int, *, weight_decay: float,
                     steps: int) -> tuple[Tensor, Tensor]:
    """A logistic regression (weight [classes, D], bias) fitted with full-batch L-BFGS on
    `features` (already standardised), deterministic for given inputs."""
    weight = torch.zeros(classes, features.shape[1], dtype=features.dtype, device=features.device, requires_grad=True)
    bias = torch.zeros(classes, dtype=features.dtype, device=features.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train: Tensor, train_labels: Tensor, test: Tensor, classes: int, *,
                 weight_decays: list[float], steps: int) -> tuple[Tensor, float]:
    """(test logits, the weight decay used): features standardised with the training split's mean
    and std; with several weight decays, each is fitted on the first 90% of the training split
    (by position) and the best on the other 10% is refitted on all of it."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        cut = train.shape[0] * 9 // 10
        accuracy = []
        for wd in weight_decays:
            w, b = fit_linear_probe(train[:cut], train_labels[:cut], classes, weight_decay=wd, steps=steps)
            accuracy.append(((train[cut:] @ w.T + b).argmax(-1) == train_labels[cut:]).double().mean().item())
        chosen = weight_decays[max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))]
    w, b = fit_linear_probe(train, train_labels, classes, weight_decay=chosen, steps=steps)
    return test @ w.T + b, chosen


def recall_hits(scores: Tensor, relevant: Tensor, ks: tuple[int, ...]) -> Tensor:
    """[len(ks)] float64: the rows of `scores` [Q, K] whose k best keys (equal scores ordered by
    key position) hold one that `relevant` [Q, K] marks (recall@k's numerator, as clip_benchmark's)."""
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :max(ks)]
    found = relevant.gather(1, order)
    return torch.tensor([float(found[:, :k].any(1).sum()) for k in ks], dtype=torch.float64)
