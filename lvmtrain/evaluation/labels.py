"""Labels of evaluation sets checked before step 1, and the zero-shot classifier of class prompts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lvmtrain.config.schema import ConfigError
from lvmtrain.data.shards import RemoteIO, ShardReader, ShardSet, local_path


def check_labels_cover(val: ShardSet | str, n_classes: int, what: str, *, source: str = "data.val", label_key: str = "cls",
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
        raise ConfigError(f"{what}: {n_classes} classes, but {source} has labels {low[0]}..{high[0]} ({outside} of "
                          f"{read} read are outside 0..{n_classes - 1}; e.g. label {label} of sample '{key}' in "
                          f"{url}); evaluation would score them against classes that do not exist: give {what} one "
                          f"entry per label, in label order, or point {source} at shards of these classes")
    return f"labels: {read:,} read, {low[0]}..{high[0]}, within the {n_classes} classes of {what}"


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, class_names: list[str], templates: list[str],
                      device: torch.device, *,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """[embed_dim, classes]: each class's text embedding averaged over the prompt templates (one
    forward per class on every rank: the same collectives under sharding backends)."""
    weights = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        with autocast():
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)
