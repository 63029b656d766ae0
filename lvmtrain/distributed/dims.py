"""World, rank, device and process group: decided once, validated once, at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lvmtrain.config.schema import ConfigError, ParallelConfig


@dataclass(frozen=True)
class Dims:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(cfg: ParallelConfig, threads: int = 0) -> Dims:
    """Read torchrun's / Slurm's environment, pick the device, start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda but no CUDA device is visible; use parallel.device=auto or cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # NOTE: every local rank would otherwise start one thread per core and they would fight.
        # Under Slurm a task owns --cpus-per-task CPUs, whatever the node has.
        threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.dist_backend=nccl needs CUDA devices; on CPU use parallel.dist_backend=gloo (or auto)")
    if backend == "nccl":
        # NOTE: NCCL's flight recorder keeps the last collectives of each rank and dumps them when
        # its own watchdog times out (30 min, after health.hang_timeout_s's stack dumps); a user's
        # settings win (TORCH_NCCL_DEBUG_INFO_TEMP_FILE says where the dumps go)
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return Dims(rank, world, local_rank, local_world, device)


def set_deterministic() -> None:
    """Deterministic kernels only; an op without one raises instead of varying silently."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (one collective for all of them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(fn, *errors: type[BaseException]):
    """`fn()` run by rank 0 alone (reads that every rank needs once, not once per rank); its
    result on every rank, or the error of one of the `errors` types it raised, raised on every rank."""
    answer = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer = (True, fn())
        except errors as e:
            answer = (False, e)
    ok, value = broadcast_object(answer)
    if not ok:
        raise value
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
