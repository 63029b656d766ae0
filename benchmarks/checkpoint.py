"""Checkpoint save and load time, and the step-loop stall of sync vs async saves, against the disk.

    python benchmarks/checkpoint.py [--model vit_b16 --dir /tmp/lvmtrain-ckpt-bench]

One process builds the model through lvmtrain's Strategy (DDP path, fp32), takes an optimizer step
so Adam's state exists, then, side by side in one run:
- the disk's sequential write speed (the limit): the same number of bytes written and fsynced;
- a synchronous save (torch.distributed.checkpoint's files, fsync, sha256 of every file, manifest,
  rename);
- an asynchronous save: how long the step loop is stalled (the copy to host memory), and how
  long until the background write is done;
- a load: verification of every file against the manifest, then restoring model and optimizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lvmtrain.checkpoint import CheckpointManager, verify
from lvmtrain.config.schema import CheckpointConfig, OptimConfig, ParallelConfig
from lvmtrain.distributed.strategy import build_strategy
from lvmtrain.models.registry import build_model


def disk_write_speed(directory: Path, nbytes: int) -> float:
    """Bytes/s of a sequential write + fsync of `nbytes` (in 64 MiB blocks)."""
    block = os.urandom(1 << 26)
    path = directory / "disk-probe.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 26)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    path.unlink()
    return max(1, nbytes >> 26) * (1 << 26) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--dir", default="/tmp/lvmtrain-ckpt-bench")
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dims = SimpleNamespace(rank=0, world=1, local_rank=0, is_main=True, distributed=False,
                           device=torch.device("cpu"))
    strategy = build_strategy(ParallelConfig(), dims, "fp32")
    model = build_model(args.model, image_size=32, num_classes=10)
    strategy.setup(model, OptimConfig(warmup_steps=1), total_steps=10)
    loss = torch.nn.functional.cross_entropy(strategy.model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    strategy.backward(loss)
    strategy.step()

    sync = CheckpointManager(CheckpointConfig(keep=10), root / "sync", dims)
    t = time.perf_counter()
    path = sync.save(1, {"strategy": strategy.state_dict()})
    sync_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    disk = disk_write_speed(root, size)

    asyn = CheckpointManager(CheckpointConfig(keep=10, async_save=True), root / "async", dims)
    t = time.perf_counter()
    asyn.save(1, {"strategy": strategy.state_dict()})
    stall_s = time.perf_counter() - t
    asyn.wait()
    async_s = time.perf_counter() - t

    t = time.perf_counter()
    verify(path)
    state = sync.load(path, {"strategy": strategy.load_template()})
    strategy.load_state_dict(state["strategy"])
    load_s = time.perf_counter() - t

    gb = size / 1e9
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"checkpoint {gb:.2f} GB (fp32 weights + Adam moments)")
    print(f"disk sequential write + fsync  {disk / 1e9:6.2f} GB/s  ({gb / (disk / 1e9):5.2f} s for this size)")
    print(f"sync save                      {sync_s:6.2f} s     ({gb / sync_s:5.2f} GB/s, {disk * sync_s / size:4.1f}x the disk time)")
    print(f"async save: step loop stalled  {stall_s:6.2f} s     ({stall_s / sync_s:5.2f} of a sync save)")
    print(f"async save: written after      {async_s:6.2f} s")
    print(f"load (verify + restore)        {load_s:6.2f} s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
