"""`FlatSlice`: contiguous ranges of flattened tensors (ZeRO's partitions) written as DCP chunks of
each tensor's own shape, read back whole by one process and resharded onto another world size."""

from __future__ import annotations

import itertools
import math
import random
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lvmtrain.distributed.flat_slice import FlatSlice, boxes
from tests.conftest import spawn_ranks

SHAPES = {"matrix": (7, 5), "conv": (3, 2, 4, 3), "vector": (11,), "scalar": (), "bf16": (5, 3)}


@pytest.mark.parametrize("shape", [(), (1,), (9,), (4, 6), (3, 1, 5), (2, 3, 4, 5)])
def test_boxes_cover_each_element_of_a_range_once_in_flat_order(shape):
    n, rng = math.prod(shape), random.Random(0)
    ranges = {(0, n), (0, 0)} | {tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(60) if n >= 1}
    for start, stop in ranges:
        got, pos = [], start
        for offsets, sizes in boxes(shape, start, stop):
            assert all(s > 0 for s in sizes) and len(offsets) == len(shape)
            cells = [sum(i * math.prod(shape[d + 1:]) for d, i in enumerate(index))
                     for index in itertools.product(*(range(o, o + s) for o, s in zip(offsets, sizes)))]
            assert cells == list(range(pos, pos + len(cells)))  # contiguous, right after the last box
            got += cells
            pos += len(cells)
        assert got == list(range(start, stop))
        assert len(boxes(shape, start, stop)) <= max(1, 2 * len(shape) - 1)


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def my_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """ZeRO-3's split: ceil(n / world) a rank, the last ones short or empty."""
    share = -(-numel // world)
    start = min(rank * share, numel)
    return start, min(start + share, numel)


def _save(rank, world, port, path, out):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        state = {"step": torch.tensor(3.0)}
        for name, t in full_tensors().items():
            start, stop = my_range(t.numel(), rank, world)
            flat = t.reshape(-1)[start:stop].clone()
            # a bf16 parameter (no fp32 master copy) is stored in fp32, converted chunk by chunk
            state[name] = FlatSlice(t.shape, flat.bfloat16() if name == "bf16" else flat, start, torch.float32)
        dcp.save(state, checkpoint_id=f"{path}/sync")
        dcp.async_save(state, checkpoint_id=f"{path}/async").result()  # staged to host memory first
        out.put((rank, "ok"))
    except Exception:  # noqa: BLE001 - reported to the test
        out.put((rank, traceback.format_exc()))


def _load(rank, world, port, path, kind, out):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        state, flats = {}, {}
        for name, t in full_tensors().items():
            start, stop = my_range(t.numel(), rank, world)
            flats[name] = torch.full((stop - start,), float("nan"))
            state[name] = FlatSlice(t.shape, flats[name], start)
        dcp.load(state, checkpoint_id=f"{path}/{kind}")
        for name, t in full_tensors().items():
            start, stop = my_range(t.numel(), rank, world)
            want = t.reshape(-1)[start:stop]
            want = want.bfloat16().float() if name == "bf16" else want
            assert torch.equal(flats[name], want), (name, flats[name], want)  # read in place, into the range
        out.put((rank, "ok"))
    except Exception:  # noqa: BLE001 - reported to the test
        out.put((rank, traceback.format_exc()))


def test_ranges_saved_on_2_ranks_load_whole_and_on_3(tmp_path):
    path = str(tmp_path)
    assert spawn_ranks(_save, 2, path) == {0: "ok", 1: "ok"}
    for kind in ("sync", "async"):
        whole = {name: torch.zeros(shape) for name, shape in SHAPES.items()} | {"step": torch.tensor(0.0)}
        dcp.load(whole, checkpoint_id=f"{path}/{kind}", no_dist=True)
        for name, t in full_tensors().items():
            assert torch.equal(whole[name], t.bfloat16().float() if name == "bf16" else t), (kind, name)
        assert whole["step"].item() == 3.0
        assert spawn_ranks(_load, 3, path, kind) == {0: "ok", 1: "ok", 2: "ok"}
