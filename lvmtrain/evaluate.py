"""Evaluation sharded across ranks: top-1 of a classifier, CLIP zero-shot top-1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lvmtrain.config.schema import ConfigError
from lvmtrain.data.shards import DataError, RemoteIO, ShardReader, ShardSet, local_path
from lvmtrain.distributed.dims import all_reduce_max, all_reduce_sum


def check_labels_cover(val: ShardSet | str, n_classes: int, what: str, *, label_key: str = "cls",
                       io: RemoteIO | None = None, remote_per_shard: int = 32, max_remote_shards: int = 64) -> str:
    """Refuse (ConfigError) evaluation shards with a label outside 0..n_classes-1, before step 1.

    `what` is the key that sets `n_classes` (`eval.class_names` for CLIP zero-shot,
    `model.num_classes` for a classifier). Every label of local shards is read (a few bytes per
    sample, ~0.4 s per 100k locally); of remote ones the first `remote_per_shard` samples of up to
    `max_remote_shards` shards (one read-ahead each). Samples without a readable label are left to
    the loader, which counts them. Returns a one-line summary.
    """
    shards = ShardSet.from_spec(val, io) if isinstance(val, str) else val
    remote = [i for i, url in enumerate(shards.urls) if local_path(url) is None and shards.count(i)]
    remote = set(remote[:: max(1, len(remote) // max_remote_shards)][:max_remote_shards])
    reader = ShardReader(max_open=1, io=io or shards.io)
    read, low, high, outside = 0, None, None, 0
    try:
        for i, url in enumerate(shards.urls):
            if not shards.count(i) or (local_path(url) is None and i not in remote):
                continue
            try:
                table = shards.table(i)
                for position in range(len(table) if local_path(url) is not None else min(len(table), remote_per_shard)):
                    sample = table[position]
                    if label_key not in sample.files:
                        continue
                    try:
                        label = int(reader.read(url, *sample.files[label_key]).strip())
                    except ValueError:
                        continue
                    read += 1
                    outside += not 0 <= label < n_classes
                    if high is None or label > high[0]:
                        high = (label, sample.key, url)
                    if low is None or label < low[0]:
                        low = (label, sample.key, url)
            except OSError:  # the loader meets it again, and counts it
                continue
    finally:
        reader.close()
    if not read:
        return f"labels: none read from {len(shards.urls)} evaluation shard(s) (no .{label_key} members)"
    if outside:
        label, key, url = high if high[0] >= n_classes else low
        raise ConfigError(f"{what}: {n_classes} classes, but data.val has labels {low[0]}..{high[0]} ({outside} of "
                          f"{read} read are outside 0..{n_classes - 1}; e.g. label {label} of sample '{key}' in "
                          f"{url}); evaluation would score them against classes that do not exist: give {what} one "
                          f"entry per label, in label order, or point data.val at shards of these classes")
    return f"labels: {read:,} read, {low[0]}..{high[0]}, within the {n_classes} classes of {what}"


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, class_names: list[str], templates: list[str],
                      device: torch.device) -> torch.Tensor:
    """[embed_dim, classes]: each class's text embedding averaged over the prompt templates."""
    weights = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def top1(model: nn.Module, loader, device: torch.device, *, classifier: torch.Tensor | None = None,
         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
         normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, float]:
    """Top-1 accuracy over every rank's share of the evaluation set.

    With `classifier` (zero-shot weights) images are scored against class text embeddings,
    otherwise the model's own logits are used. `normalize` turns the loader's uint8 images into
    the model's input. A label outside the classes raises DataError (on every rank, after the
    loop: under sharding backends each forward is a collective all ranks must join).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct, samples, labels outside
    classes = classifier.shape[1] if classifier is not None else 0
    largest, example = -1, ""
    for batch in loader:
        images = normalize(batch.image.to(device, non_blocking=True))
        batch.release()  # `normalize` made a new tensor: the loader may refill the buffer
        host_labels = batch.label
        labels = host_labels.to(device, non_blocking=True)
        with autocast():
            if classifier is not None:
                logits = F.normalize(model.encode_image(images).float(), dim=-1) @ classifier
            else:
                logits = model(images).float()
        # NOTE: checked on the host copy: no device sync per batch. A label past the classes would
        # otherwise only ever count as a miss, and top-1 looks merely poor.
        classes = logits.shape[-1]
        outside = (host_labels < 0) | (host_labels >= classes)
        if outside.any():
            j = int(outside.nonzero()[0])
            counts[2] += int(outside.sum())
            largest = max(largest, int(host_labels.max()))
            example = example or f"label {int(host_labels[j])} of sample '{batch.keys[j]}' in {batch.shards[j]}"
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    if counts[2] > 0:  # the same on every rank after the sum: all of them join these collectives
        largest, classes = all_reduce_max(torch.tensor([largest, classes], dtype=torch.int64, device=device)).tolist()
        key = "eval.class_names" if classifier is not None else "model.num_classes"
        raise DataError(f"evaluation: {int(counts[2])} of {int(counts[1])} samples of data.val have a label outside "
                        f"0..{classes - 1} (largest label {largest}{'; e.g. ' + example if example else ''}), but "
                        f"there are {classes} classes ({key}); top-1 would count them as misses: give {key} one "
                        f"entry per label, in label order, or point data.val at shards of these classes")
    return {"top1": (counts[0] / counts[1].clamp(min=1)).item(), "samples": int(counts[1].item())}
