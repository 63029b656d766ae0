"""A contiguous run of a tensor's flattened elements, held by one rank, as DCP chunks of the tensor.

ZeRO partitions a flattened parameter (or a flat group of them) into contiguous ranges, one a
rank, that start and end anywhere: mid-row of a matrix, mid-channel of a convolution. DCP stores
a tensor as rectangular chunks of its own shape. A contiguous range [start, stop) of a row-major
tensor is the union of at most 2 x (dims - 1) + 1 rectangles (the rest of the first row, whole
rows, the start of the last row, recursively inside a row), each contiguous in the range itself.
`FlatSlice` hands DCP those rectangles as views of the rank's own flat buffer: the checkpoint is
the canonical one (every tensor by name in its own shape, as DDP and FSDP2 write it), written
and read without any rank ever holding the whole tensor, and loaded by any backend on any world
size through DCP's resharding.

It is a tensor subclass (as DTensor is) only so that DCP's lookups accept it; it holds no data of
its own and supports no operation: `to_local()` is the rank's flat range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in the tensor's own shape


def boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The rectangles whose union is the flat range [start, stop) of a row-major `shape`, in flat
    order (each one contiguous, each following the last)."""
    if start >= stop:
        return []
    if len(shape) == 0:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    (r0, c0), (r1, c1) = divmod(start, inner), divmod(stop, inner)
    rest = len(shape) - 1

    def within(row: int, a: int, b: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in boxes(shape[1:], a, b)]

    if r0 == r1:
        return within(r0, c0, c1)
    out: list[Box] = []
    if c0:
        out += within(r0, c0, inner)
        r0 += 1
    if r1 > r0:
        out.append(((r0, *(0,) * rest), (r1 - r0, *shape[1:])))
    if c1:
        out += within(r1, 0, c1)
    return out


class FlatSlice(Tensor):
    """Elements [start, start + flat.numel()) of a tensor of `shape`, flattened, as DCP chunks.

    `flat` is the rank's 1-D buffer (a view into ZeRO's partition: saved from, or loaded into, in
    place). `dtype` is what the checkpoint stores (saving): a `flat` of another dtype (a bf16
    parameter with no fp32 master copy) is converted one chunk at a time as DCP writes it. Loading
    reads into `flat` itself, converting to its dtype.
    """

    @staticmethod
    def __new__(cls, shape: torch.Size | tuple[int, ...], flat: Tensor, start: int,
                dtype: torch.dtype | None = None) -> "FlatSlice":
        self = Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype or flat.dtype, device=flat.device)
        self._flat, self._start = flat.detach(), start  # NOTE: no autograd history for DCP's staging to copy
        self._pieces, pos = [], 0
        for offsets, sizes in boxes(tuple(shape), start, start + flat.numel()):
            self._pieces.append((offsets, sizes, pos))
            pos += math.prod(sizes)
        return self

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __repr__(self) -> str:
        return f"FlatSlice(shape={tuple(self.shape)}, start={self._start}, numel={self._flat.numel()})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.new_empty.default:
            # NOTE: DCP's async staging copies a tensor subclass as `new_empty` plus a deep copy of
            # its attributes (here the flat buffer, staged to host memory: this rank's range only).
            self, size = args
            return Tensor._make_wrapper_subclass(cls, self.shape, dtype=self.dtype, device=(kwargs or {}).get("device"))
        raise TypeError(f"FlatSlice supports no tensor operation ({func}); use to_local()")

    def to_local(self) -> Tensor:
        return self._flat

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                      properties=props, size=self.shape))
                for i, (offsets, sizes, _) in enumerate(self._pieces)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes, _ in self._pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        for offsets, sizes, pos in self._pieces:
            if torch.Size(offsets) == index.offset:
                piece = self._flat.narrow(0, pos, math.prod(sizes)).detach()
                if piece.dtype != self.dtype:  # saving a bf16 parameter in fp32: a copy of this chunk only
                    return piece.to(self.dtype).view(sizes)
                if piece.device.type == "cpu" and piece.dtype != torch.bfloat16:
                    # NOTE: a view shares the whole partition's buffer, so DCP's writer would copy it
                    # to write it (and keep every copy until the rank's file is closed: the
                    # partition twice over). A tensor over the chunk's own memory is written as it
                    # is, and read into in place.
                    piece = torch.from_numpy(piece.numpy())
                return piece.view(sizes)
        raise ValueError(f"{index.fqn}: this rank holds no chunk at {tuple(index.offset or ())} ({self!r})")

