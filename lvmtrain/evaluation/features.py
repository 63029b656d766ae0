"""Frozen features of an evaluation set, embedded by every rank for its share, and the
collectives that bring them together: gathered in set order, or searched where they lie (k-NN)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lvmtrain.evaluation.scores import merge_topk


@dataclass
class Embedded:
    """This rank's share of a set, batch by batch (kept apart: a batch is the same on any world
    size, so computations per batch are too)."""

    features: list[Tensor] = field(default_factory=list)
    """[b, D] float32 per batch, on the device."""
    labels: list[Tensor] = field(default_factory=list)
    index: list[Tensor] = field(default_factory=list)
    """Positions in the set, int64 per batch."""
    captions: list[list[str]] = field(default_factory=list)
    keys: list[list[str]] = field(default_factory=list)
    shards: list[list[str]] = field(default_factory=list)
    skipped: int = 0
    """Samples left out as unusable (the loader reports each)."""

    def cat(self, name: str, device: torch.device) -> Tensor:
        parts = getattr(self, name)
        return torch.cat([p.to(device) for p in parts]) if parts else torch.empty(0, device=device)


@torch.no_grad()
def embed(loader, encode: Callable[[Tensor], Tensor], device: torch.device, *, normalize: Callable[[Tensor], Tensor],
          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
          on_batch: Callable | None = None) -> Embedded:
    """Run `encode` (images -> [b, D]) over this rank's batches; `on_batch(batch, features)`
    sees each (e.g. to encode its captions): it must make the same collective calls on every rank."""
    out = Embedded()
    for batch in loader:
        images = normalize(batch.image.to(device, non_blocking=True))
        batch.release()  # `normalize` made a new tensor: the loader may refill the buffer
        with autocast():
            features = encode(images).float()
        out.features.append(features)
        out.index.append(batch.index)
        out.keys.append(batch.keys)
        out.shards.append(batch.shards)
        if batch.label is not None:
            out.labels.append(batch.label)
        if batch.captions is not None:
            out.captions.append(batch.captions)
        out.skipped += len(batch.skipped)
        if on_batch is not None:
            on_batch(batch, features)
    return out


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_rows(rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's `rows` [n, ...] with their `index` [n], ordered by index (collective; every
    rank gets the whole). Holds the set's rows on every rank: for what needs all of them at once
    (retrieval's keys, a linear probe's training features)."""
    if _world() > 1:
        count = torch.tensor([rows.shape[0]], device=rows.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        pad = int(count) - rows.shape[0]
        padded = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
        idx = torch.cat([index.to(rows.device), torch.full((pad,), -1, dtype=torch.int64, device=rows.device)])
        all_rows = [torch.empty_like(padded) for _ in range(_world())]
        all_idx = [torch.empty_like(idx) for _ in range(_world())]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_idx, idx)
        rows, index = torch.cat(all_rows), torch.cat(all_idx)
        keep = index >= 0
        rows, index = rows[keep], index[keep]
    order = index.argsort()
    return rows[order], index[order].to(rows.device)


def knn_search(queries: Tensor, bank: Embedded, k: int, *, chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """(similarities, positions, labels) [Q, k] of each query's k nearest bank features by cosine
    (both normalised; `queries` the same on every rank; the bank stays where it was embedded, each
    rank searching its own share: collective). Queries go in fixed chunks and the bank batch by
    batch, so every similarity is computed alike on any world size; equal ones are ordered by
    position."""
    device = queries.device
    sims_out, index_out, labels_out = [], [], []
    for lo in range(0, queries.shape[0], chunk):
        q = queries[lo:lo + chunk]
        best = (q.new_full((q.shape[0], 0), float("-inf")), torch.empty((q.shape[0], 0), dtype=torch.int64, device=device),
                torch.empty((q.shape[0], 0), dtype=torch.int64, device=device))
        for features, index, labels in zip(bank.features, bank.index, bank.labels):
            if not features.shape[0]:
                continue
            sims = q @ features.T
            expand = lambda t: t.to(device)[None].expand(q.shape[0], -1)  # noqa: E731
            best = merge_topk(torch.cat([best[0], sims], 1), torch.cat([best[1], expand(index)], 1), k,
                              torch.cat([best[2], expand(labels)], 1))
        best = _pad_candidates(best, k)
        if _world() > 1:
            gathered = [[torch.empty_like(t) for _ in range(_world())] for t in best]
            for out, t in zip(gathered, best):
                dist.all_gather(out, t.contiguous())
            best = merge_topk(*(torch.cat(parts, 1) for parts in gathered[:2]), k, torch.cat(gathered[2], 1))
        sims_out.append(best[0])
        index_out.append(best[1])
        labels_out.append(best[2])
    if not sims_out:
        empty = torch.empty((0, k), dtype=torch.int64, device=device)
        return torch.empty((0, k), device=device), empty, empty
    return torch.cat(sims_out), torch.cat(index_out), torch.cat(labels_out)


def _pad_candidates(best: tuple[Tensor, Tensor, Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A rank with fewer than k bank samples pads with -inf similarities (never chosen over a real
    one), so every rank sends candidates of one shape."""
    sims, index, labels = best
    pad = k - sims.shape[1]
    if pad <= 0:
        return best
    q = sims.shape[0]
    return (torch.cat([sims, sims.new_full((q, pad), float("-inf"))], 1),
            torch.cat([index, index.new_full((q, pad), torch.iinfo(torch.int64).max)], 1),
            torch.cat([labels, labels.new_zeros((q, pad))], 1))
