"""Checkpoint budget at 64-1,024 GPUs: bytes per rank, host memory during a save, write time.

    python benchmarks/checkpoint_budget.py [--node-gbps 2 --d2h-gbps 10 --gpus-per-node 8]
    python benchmarks/checkpoint_budget.py --measure   # the formulas against real saves, 2 CPU ranks

Every backend writes the canonical checkpoint (fp32 weight, exp_avg and exp_avg_sq of each
parameter, by name, in its own shape) as DCP chunks of what the rank holds, so the formulas
below follow the partitioning of each backend, parameter by parameter:
- ZeRO-1/2: each optimizer param group is one flat buffer, padded to a multiple of 2 x N elements
  and cut into N equal ranges; a rank writes, of each parameter, the part inside its range (at
  most 2 x dims - 1 rectangular chunks of the parameter's shape: `FlatSlice`).
- ZeRO-3: each parameter flattened, padded to a multiple of N, cut into N equal ranges.
- FSDP2: each parameter's rows cut into N chunks of ceil(rows / N) (torch.chunk's split).
A chunk costs its bytes plus torch.save's record (~1.5 KB). Host memory during a save, beyond
the training state itself:
- sync: DCP's writer copies a chunk to host memory when it is on a GPU, or a view into a larger
  buffer, and keeps every copy until the rank's file is closed. On a GPU that is everything the
  rank writes (its partition's state, whatever the backend); on CPU, FSDP2's short last shards
  only: `FlatSlice` hands ZeRO's chunks over as arrays of their own memory, not views.
- async: the staged copy of every buffer the rank's chunks live in (ZeRO: its padded partitions;
  FSDP2: its padded shards), plus the copies above of the staged (host) chunks while writing.
Before this design, ZeRO gathered every whole fp32 tensor on every rank: 12 bytes x parameters.
Write time: a node's bytes over `--node-gbps` (sync, and async in the background); async stalls
the step loop only for the copy to host memory at `--d2h-gbps`. Both bandwidths are inputs to
state, not measurements (no GPU cluster has been measured here).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import io
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import kb_fields, reset_peak_rss  # noqa: E402
from _torchrun import run_worker  # noqa: E402

PRESETS = ("clip_l14", "clip_h14", "clip_g14", "vit_g14")
BACKENDS = {"zero2": {"backend": "deepspeed", "zero_stage": 2}, "zero3": {"backend": "deepspeed", "zero_stage": 3},
            "fsdp2": {"backend": "fsdp"}}
WORLDS = (64, 256, 1024)
FP32 = 4
KEYS = ("weight", "exp_avg", "exp_avg_sq")
# The measured debug model: a 2-block ViT wide enough that its chunks, not the interpreter, dominate.
DEBUG = dict(image_size=32, patch_size=4, width=1536, depth=2, num_heads=12, num_classes=10)


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    group: int  # the optimizer's param group (0: decayed, 1: not)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Chunk:
    numel: int
    ndim: int
    copied: bool  # copied by DCP's writer even from host memory (a view into a larger buffer)


def model_params(model: torch.nn.Module) -> list[Param]:
    from lvmtrain.optim import param_group_names

    decay, _ = param_group_names(model, 0.05)
    decay = set(decay)
    return [Param(n, tuple(p.shape), 0 if n in decay else 1) for n, p in model.named_parameters()]


def preset_params(name: str) -> list[Param]:
    from lvmtrain.models.registry import build_model

    with torch.device("meta"):
        return model_params(build_model(name))


def debug_params() -> list[Param]:
    from lvmtrain.models.vit import VisionTransformer

    with torch.device("meta"):
        return model_params(VisionTransformer(**DEBUG))


def _record_bytes(ndim: int) -> int:
    """torch.save's bytes around a tensor's data (DCP writes each chunk as one torch.save)."""
    buf = io.BytesIO()
    torch.save(torch.zeros((1,) * ndim), buf)
    return len(buf.getvalue()) - FP32


RECORD = {ndim: _record_bytes(ndim) for ndim in range(5)}


def _share(backend: str, p: Param, world: int) -> int:
    """ZeRO-3 and FSDP2: the elements of `p` each rank's (padded) shard has room for: ceil(n / N),
    or ceil(rows / N) whole rows."""
    if backend == "zero3":
        return -(-p.numel // world)
    rows = p.shape[0] if p.shape else 1
    return -(-rows // world) * (p.numel // rows)


def _zero2_part(params: list[Param], group: int, world: int) -> int:
    """ZeRO-1/2: a rank's elements of a param group's flat buffer, padded to a multiple of 2 x N."""
    return -(-sum(p.numel for p in params if p.group == group) // (2 * world)) * 2


def ranges(backend: str, params: list[Param], world: int, rank: int) -> dict[str, tuple[int, int]]:
    """{parameter: (start, stop)} of its flattened elements this rank holds (FSDP2: whole rows)."""
    out = {}
    if backend != "zero2":
        for p in params:
            share = _share(backend, p, world)
            out[p.name] = (min(rank * share, p.numel), min((rank + 1) * share, p.numel))
        return out
    for group in (0, 1):
        part, offset = _zero2_part(params, group, world), 0
        for p in (p for p in params if p.group == group):
            out[p.name] = (min(max(rank * part - offset, 0), p.numel), min(max((rank + 1) * part - offset, 0), p.numel))
            offset += p.numel
    return out


def padded(backend: str, params: list[Param], world: int) -> int:
    """Elements of each of a rank's state buffers (weights; each moment the same): what an async
    save stages."""
    if backend == "zero2":
        return sum(_zero2_part(params, g, world) for g in (0, 1))
    return sum(_share(backend, p, world) for p in params)


def chunks(backend: str, params: list[Param], world: int, rank: int) -> list[Chunk]:
    """The rank's chunks in DCP's write order: every weight, then per parameter its step count
    (written by one rank: counted a share of on each) and moments."""
    from lvmtrain.distributed.flat_slice import boxes

    own = ranges(backend, params, world, rank)

    def pieces(p: Param, key: str) -> list[Chunk]:
        start, stop = own[p.name]
        if start >= stop:
            return []
        if backend == "fsdp2":  # one chunk; a short last shard is a view DCP copies
            short = stop - start < _share(backend, p, world)
            return [Chunk(stop - start, len(p.shape), copied=key == "weight" and short)]
        return [Chunk(math.prod(s), len(p.shape), False) for _, s in boxes(p.shape, start, stop)]

    out = [c for p in params for c in pieces(p, "weight")]
    for i, p in enumerate(params):
        out += [Chunk(1, 0, False)] if i % world == rank else []
        out += [c for key in KEYS[1:] for c in pieces(p, key)]
    return out


def file_bytes(items: list[Chunk]) -> int:
    return sum(c.numel * FP32 + RECORD[c.ndim] for c in items)


def sync_extra(items: list[Chunk], *, on_gpu: bool) -> int:
    """Host bytes of the copies DCP's writer keeps until the rank's file is closed."""
    return sum(c.numel * FP32 for c in items if c.copied or on_gpu)


def budget(backend: str, params: list[Param], world: int, *, on_gpu: bool = True, ranks=None) -> dict:
    """Per rank (the largest over `ranks`, default: all, sampled for big worlds): bytes written,
    host memory during a sync and an async save; the whole checkpoint's bytes."""
    ranks = ranks if ranks is not None else sorted({0, 1, world // 2, world - 2, world - 1} & set(range(world)))
    per_rank = {r: chunks(backend, params, world, r) for r in ranks}
    staged = padded(backend, params, world) * len(KEYS) * FP32
    rank_bytes = {r: file_bytes(items) for r, items in per_rank.items()}
    sync = {r: sync_extra(items, on_gpu=on_gpu) for r, items in per_rank.items()}
    state = sum(p.numel for p in params) * len(KEYS) * FP32
    records = sum(rank_bytes[r] - sum(c.numel for c in per_rank[r]) * FP32 for r in ranks) / len(ranks)
    on_host = {r: sync_extra(items, on_gpu=False) for r, items in per_rank.items()}
    return {"rank_bytes": rank_bytes, "sync_host": sync, "async_host": {r: staged + on_host[r] for r in ranks},
            "staged": staged, "total_bytes": state + world * records, "gathered_host": state}


def table(node_gbps: float, d2h_gbps: float, gpus_per_node: int) -> None:
    gb = 1e9
    print(f"Per rank: bytes written, host memory a save adds (sync / async), write time at {node_gbps} GB/s a node "
          f"({gpus_per_node} GPUs), async stall at {d2h_gbps} GB/s to host. Bandwidths are assumptions, not "
          "measurements.")
    print(f"{'model':9} {'params':>7} {'backend':7} {'GPUs':>5} {'GB/rank':>8} {'GB total':>8} {'host sync':>9} "
          f"{'host async':>10} {'gathered':>8} {'sync s':>7} {'stall s':>7}")
    for preset in PRESETS:
        params = preset_params(preset)
        n = sum(p.numel for p in params)
        for backend in BACKENDS:
            for world in WORLDS:
                b = budget(backend, params, world)
                rank = max(b["rank_bytes"].values())
                write = gpus_per_node * rank / (node_gbps * gb)
                stall = b["staged"] / (d2h_gbps * gb)
                gathered = f"{b['gathered_host'] / gb:7.1f}G" if backend.startswith("zero") else f"{'-':>8}"
                print(f"{preset:9} {n / 1e9:6.2f}B {backend:7} {world:5} {rank / gb:8.3f} {b['total_bytes'] / gb:8.1f} "
                      f"{max(b['sync_host'].values()) / gb:8.3f}G {max(b['async_host'].values()) / gb:9.3f}G "
                      f"{gathered} {write:7.2f} {stall:7.2f}")


def worker(backend: str, out_dir: str) -> None:
    """One rank: the debug model under `backend` in fp32, one step, then a sync and an async save
    (each after a warm-up save), measuring the rank's file and its peak host memory above what
    it held before the save."""
    import torch.distributed as dist

    from lvmtrain.checkpoint import CheckpointManager
    from lvmtrain.config.schema import CheckpointConfig, OptimConfig, ParallelConfig
    from lvmtrain.distributed.dims import init_distributed
    from lvmtrain.distributed.strategy import build_strategy
    from lvmtrain.models.vit import VisionTransformer

    parallel = ParallelConfig(**BACKENDS[backend])
    dims = init_distributed(parallel)
    strategy = build_strategy(parallel, dims, "fp32")
    torch.manual_seed(0)
    with strategy.init_context():
        model = VisionTransformer(**DEBUG)
    strategy.setup(model, OptimConfig(warmup_steps=1), total_steps=10, micro_batch=2, accum=1)
    with strategy.micro_step(sync_grads=True):
        loss = strategy.model(torch.randn(2, 3, 32, 32)).float().logsumexp(-1).mean()
        strategy.backward(loss)
    strategy.step()
    result = {"rank": dims.rank}
    for mode in ("sync", "async"):
        manager = CheckpointManager(CheckpointConfig(async_save=mode == "async", keep=1), Path(out_dir) / mode, dims)
        # NOTE: the sync saves warm up (imports, DCP's planner); one async save is measured: its
        # staged copy is freed by DCP's thread just after wait() returns on a rank that does not
        # commit, so a second one could start from a higher baseline.
        for step in (1, 2) if mode == "sync" else (2,):
            gc.collect()
            # NOTE: memory the last save freed can stay resident in the heap, and a save reusing it
            # would not show as new: give it back to the system first.
            ctypes.CDLL(None).malloc_trim(0)
            before = kb_fields("/proc/self/status")["VmRSS"]
            reset_peak_rss()
            manager.save(step, {"strategy": strategy.state_dict()})
            manager.wait()
            result[f"{mode}_host"] = kb_fields("/proc/self/status")["VmHWM"] - before
        dist.barrier()  # rank 0's thread commits (renames) an async save
        weights = Path(out_dir) / mode / "checkpoints" / "step_00000002" / "weights"
        result[f"{mode}_bytes"] = (weights / f"__{dims.rank}_0.distcp").stat().st_size
    gathered: list = [None] * dims.world
    dist.all_gather_object(gathered, result)
    if dims.is_main:
        print(json.dumps({"backend": backend, "world": dims.world, "ranks": gathered}), flush=True)
    dist.destroy_process_group()  # NOTE: left to the interpreter's exit, gloo's threads abort now and then


def measure(backends: list[str], world: int, out_dir: str) -> list[dict]:
    """Measured vs predicted, per backend and rank, on `world` CPU ranks."""
    params = debug_params()
    rows = []
    for backend in backends:
        measured = run_worker(__file__, world, [backend, "--out", os.path.join(out_dir, backend)])
        if measured is None:
            raise RuntimeError(f"{backend}: the measuring run failed (printed above)")
        b = budget(backend, params, world, on_gpu=False, ranks=list(range(world)))
        for got in measured["ranks"]:
            r = got["rank"]
            rows.append({"backend": backend, "rank": r,
                         "bytes": (got["sync_bytes"], b["rank_bytes"][r]),
                         "sync_host": (got["sync_host"], b["sync_host"][r]),
                         "async_host": (got["async_host"], b["async_host"][r]),
                         "gathered_host": b["gathered_host"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node-gbps", type=float, default=2.0, help="write bandwidth of one node to the checkpoint storage")
    p.add_argument("--d2h-gbps", type=float, default=10.0, help="copy bandwidth of one GPU to host memory")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--measure", action="store_true", help="check the formulas against saves of a debug model")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default="/tmp/lvmtrain-checkpoint-budget")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.out)
    if not args.measure:
        return table(args.node_gbps, args.d2h_gbps, args.gpus_per_node)
    mb = 2**20
    print(f"debug ViT {DEBUG}, {args.ranks} CPU ranks, fp32: measured / predicted (MiB)")
    for row in measure(list(BACKENDS), args.ranks, args.out):
        cells = "  ".join(f"{k} {row[k][0] / mb:7.1f} / {row[k][1] / mb:7.1f}" for k in ("bytes", "sync_host", "async_host"))
        print(f"{row['backend']:6} rank {row['rank']}  {cells}  (gathered, before: {row['gathered_host'] / mb:.0f})")


if __name__ == "__main__":
    main()
