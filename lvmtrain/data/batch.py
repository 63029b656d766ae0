"""What flows from the loader to the trainer and the evaluation: one micro-batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    image: Tensor
    """uint8 [B, H, W, 3], in a shared-memory buffer of the worker that filled it until `release()`."""
    keys: list[str]
    """Keys of the good samples, in order (a bad sample's slot holds a copy of a good one)."""
    shards: list[str]
    """The shard of each key."""
    skipped: list[dict] = field(default_factory=list)
    """{"key", "shard", "kind"} of each sample skipped as unusable (counted per kind)."""
    text: Tensor | None = None
    """Token ids [B, context], when the task reads captions."""
    label: Tensor | None = None
    """Class indices [B], when the task reads labels."""
    index: Tensor | None = None
    """Each sample's position in its shard set (int64 [B]): evaluation orders gathered features by it."""
    captions: list[str] | None = None
    """The raw captions, when the evaluation reads them (retrieval: one caption per line)."""
    views: list[Tensor] | None = None
    """Multi-crop views, when the task reads "views": uint8 [B, size, size, 3] each, the global crops
    then the local ones; views[0] is `image` (the same tensor) and shares its buffer."""
    cursor: tuple[int, int] | None = None
    """(epoch, consumed) of the data position after this batch (training batches only)."""
    release_buffer: Callable[[], None] | None = None
    """Hands `image`'s (and `views`') buffer back to its worker (see loader.SharedBuffers)."""

    def release(self) -> None:
        """Call once the image and views have been copied out (normalised): the worker may then refill them."""
        if self.release_buffer is not None:
            self.release_buffer()
            self.release_buffer = None

    def to(self, device: torch.device, fields: tuple[str, ...]) -> Batch:
        """A batch with "image" and `fields` on `device` (non-blocking from pinned memory)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in ("image", *fields)
                 if name != "views"}
        if "views" in fields:
            moved["views"] = [moved["image"] if v is self.image else v.to(device, non_blocking=True)
                              for v in self.views]
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> Batch:
        """DataLoader's pin-memory thread calls this: pinned tensors copy to a GPU asynchronously."""
        pinned = {name: t.pin_memory() for name in ("image", "text", "label")
                  if (t := getattr(self, name)) is not None}
        if self.views is not None:
            pinned["views"] = [pinned["image"] if v is self.image else v.pin_memory() for v in self.views]
        return dataclasses.replace(self, **pinned)
