"""Peak memory per rank of the SigLIP loss, ring vs all-gather, as the world grows.

    python benchmarks/siglip_memory.py [--batch 2048 --dim 256 --worlds 1,2,3,4]

For each world size this starts `torchrun --nproc_per_node=WORLD` (gloo, CPU) on this script's
worker. Every rank holds a fixed local batch of BATCH x DIM fp32 image and text features and runs
the loss's forward + backward once per version (after one warm-up). What is measured: the peak,
over that forward + backward, of the bytes of all tensor storages created by aten operators in
it (a TorchDispatchMode sees each operator's outputs; a new storage counts from its creation until
it is freed; a view or an in-place result shares an input's storage and adds nothing). That
includes the gathered texts, every logits block, what autograd keeps for backward, the received
ring buffers and the gradients handed to the features' `.grad`; it excludes the features
themselves (made before) and memory kernels allocate inside themselves (gloo's transport buffers,
BLAS workspaces). CPU has no `max_memory_allocated`.

Expected (n = BATCH, d = DIM, N = n * world): the gathered loss peaks with the N x d texts and
about five n x N blocks, growing with the world. The ring peaks in its backward at one n x n
block plus n x d buffers: two at world 1 (the image gradient, the text gradient); five from
world 3 on (the image gradient, a text gradient going out and one coming in, the block held and
the block coming in); four at world 2, whose last hop has no next block. So it is flat from
world 3 on, and within 10% of world 1 only where the n x n block dominates (n >= ~28 d).
"""

from __future__ import annotations

import argparse
import json
import weakref

from _torchrun import run_worker

MIB = 2**20


def peak_tensor_bytes(fn) -> int:
    """Run `fn()` and return the peak bytes of the tensor storages its operators created."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def plain_storage(t):
        # NOTE: a tensor subclass (funcol's wrapper of a collective's result) has no storage of
        # its own; the tensor it wraps was an operator's output, counted there.
        return t.untyped_storage() if type(t) is torch.Tensor else None

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self.sizes = 0, 0, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {s.data_ptr() for s in map(plain_storage, tree_leaves((args, kwargs))) if s is not None}
            for storage in map(plain_storage, tree_leaves(out)):
                if storage is None or not storage.nbytes():
                    continue
                ptr = storage.data_ptr()
                if ptr in inputs or ptr in self.sizes:  # a view or an in-place result
                    continue
                self.sizes[ptr] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                # NOTE: torch keeps a storage's Python object alive as long as the storage itself,
                # so this runs when the memory is released, not when `storage` goes out of scope.
                weakref.finalize(storage, self.release, ptr)
            return out

        def release(self, ptr: int) -> None:
            self.live -= self.sizes.pop(ptr)

    with Tracker() as tracker:
        fn()
    return tracker.peak


def worker(batch: int, dim: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from lvmtrain.tasks.siglip_loss import siglip_loss_gathered, siglip_loss_ring

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    images = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    peaks = {}
    for name, loss_fn in (("ring", siglip_loss_ring), ("gathered", siglip_loss_gathered)):
        def forward_backward():
            for t in (images, texts, scale, bias):
                t.grad = None
            loss_fn(images, texts, scale, bias).backward()

        forward_backward()
        peaks[name] = peak_tensor_bytes(forward_backward)
    every = [None] * world
    dist.all_gather_object(every, peaks)
    if rank == 0:
        print(json.dumps({"world": world, "ranks": every}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048, help="local batch n (pairs per rank)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension d")
    p.add_argument("--worlds", default="1,2,3,4")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.batch, args.dim)
    n, d = args.batch, args.dim
    print(f"local batch {n} x {d} fp32 per rank; peak MiB of tensors made by the loss's forward + backward, "
          f"largest over ranks (one n x n block = {n * n * 4 / MIB:.1f}, one n x d = {n * d * 4 / MIB:.1f}):")
    print(f"{'world':>5} {'ring':>9} {'/ w1':>6} {'gathered':>9} {'/ w1':>6} {'gathered/ring':>14}")
    first = None
    for world in map(int, args.worlds.split(",")):
        r = run_worker(__file__, world, [f"world={world}", "--batch", str(n), "--dim", str(d)])
        if r is None:
            continue
        ring = max(rank["ring"] for rank in r["ranks"]) / MIB
        gathered = max(rank["gathered"] for rank in r["ranks"]) / MIB
        first = first or (ring, gathered)
        print(f"{world:5d} {ring:9.2f} {ring / first[0]:6.2f} {gathered:9.2f} {gathered / first[1]:6.2f} "
              f"{gathered / ring:14.2f}")


if __name__ == "__main__":
    main()
