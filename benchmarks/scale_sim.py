"""The epoch order and per-rank dealing at LAION-5B scale, with no images.

    python benchmarks/scale_sim.py [--seed 0] [--windows 16000] [--sampled-positions 8000000]

Runs the real code of lvmtrain.data.order (EpochOrder, plan_rank_step, cursor_state,
check_order_version), nothing re-implemented, on 5.85B samples in ~590k shards of uneven sizes
(img2dataset-like: 10,000 attempted per shard, 0.3-1.5 % failed downloads each, 0.5 % of
shards lost whole) in three sources (laion2B-en, laion2B-multi, laion1B-nolang), block 64,
window 4, 512 to 4,096 ranks x 8 loader workers, 32 samples per rank and step. Checks:

1. Exactly once per epoch, streaming, over the WHOLE epoch at block level: every one of the
   epoch's ~91M block slots is mapped to its (first sample, count) in chunks, and an
   order-independent checksum (sum of a 64-bit hash of each block's first sample, sum of counts,
   sum of sample indices; all mod 2^64) is compared with the one computed from the sources in
   source order. No set of 5.85B keys is held.
   Sample level, on a stated subset (a full sample-level pass runs ~3.5M positions/s on one
   core, ~28 min for the epoch): (a) `--windows` random whole shuffle windows, contiguous runs of
   them, plus the first and last window: the slice holds exactly the samples of the block-order
   positions it covers (the window shuffle is a bijection of each window, no sample repeated);
   (b) `--sampled-positions` positions drawn uniformly from the whole epoch: two positions give
   the same sample only if they are the same position.
   Together: the blocks are exactly the epoch's multiset (1) and each window permutes its own
   positions (a), so each sample of weight 1 is seen exactly once.
2. Equal batches per rank: at 512, 1,024, 2,048 and 4,096 ranks, for 8 random steps plus the first
   and last of the epoch, ALL ranks' plans have 32 samples, and concatenated in rank order they
   are the step's global batch (the slice [t*G, (t+1)*G) of the epoch's order); at 4,096 ranks,
   8 random ranks over 16 consecutive steps, each step planned as the loader would by worker
   step % 8 on its own EpochOrder, equal the rank's plan.
3. Resume onto another world size: a cursor saved at a random step of a 4,096-rank run is
   serialised (JSON), checked for the order version, and resumed on 3,968 ranks (a lost node,
   so the global batch shrinks from 131,072 to 126,976). For the last 2 steps before the cursor
   and the first 3 after it, all ranks: the positions run on with no gap or overlap and no sample
   repeats; 64 sampled ranks at the last step and 15 random later ones get 32 distinct samples;
   the samples dropped at the epoch's end are fewer than one global batch.
Prints the cursor's size, the per-process memory of the global data state (the real ShardSet of
the ~590k shard URLs and counts, as rank 0 broadcasts it, + the order's state, measured with
tracemalloc) per shard, and the time for a rank to plan one step and locate its samples' shards. Takes ~2-4 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
import pickle
import tracemalloc

import numpy as np

from lvmtrain.data.dataset_index import Counted
from lvmtrain.data.shards import ShardSet
from lvmtrain.data.order import (EpochOrder, _mix, check_order_version, cursor_state, plan_rank_step,
                                 steps_per_epoch)

SOURCES = [("laion2B-en", 2_320_000_000), ("laion2B-multi", 2_260_000_000), ("laion1B-nolang", 1_270_000_000)]
BLOCK, WINDOW, PER_RANK, WORKERS = 64, 4, 32, 8
U = np.uint64


def make_shards(rng) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Per-shard sample counts (img2dataset-like) and each source's [lo, hi) of global indices."""
    counts, ranges, lo = [], [], 0
    for _, target in SOURCES:
        n = int(round(target / 9_860))  # the mean count below
        ok = 1.0 - rng.uniform(0.003, 0.015, n)
        c = rng.binomial(10_000, ok).astype(np.int64)
        c[rng.random(n) < 0.005] = 0  # a shard whose download failed whole
        counts.append(c)
        ranges.append((lo, lo + int(c.sum())))
        lo += int(c.sum())
    return np.concatenate(counts), ranges


def block_hash(first: np.ndarray) -> np.ndarray:
    return _mix(first.astype(U) ^ U(0x5DEECE66D))


def check_blocks(order: EpochOrder, ranges, chunk: int = 1 << 23) -> None:
    """1: the whole epoch's blocks, streamed, against the sources' blocks (weights 1)."""
    t = time.perf_counter()
    got = [0, 0, 0]  # Python ints, reduced mod 2^64 at the end
    for a in range(0, order.blocks, chunk):
        first, count = order.blocks_at(np.arange(a, min(a + chunk, order.blocks), dtype=np.int64))
        got[0] += int(block_hash(first).sum(dtype=U))
        got[1] += int(count.sum())
        got[2] += int((count * first + count * (count - 1) // 2).sum(dtype=U))  # sum of indices
    want = [0, 0, 0]
    for lo, hi in ranges:
        first = np.arange(lo, hi, BLOCK, dtype=np.int64)
        count = np.minimum(BLOCK, hi - first)
        want[0] += int(block_hash(first).sum(dtype=U))
        want[1] += int(count.sum())
        want[2] += int((count * first + count * (count - 1) // 2).sum(dtype=U))
    got[0], got[2], want[0], want[2] = (v % (1 << 64) for v in (got[0], got[2], want[0], want[2]))
    assert got == want, f"block checksum {got} != {want}"
    assert got[1] == order.size == ranges[-1][1]
    print(f"PASS exactly once (blocks, whole epoch): {order.blocks:,} block slots streamed, checksum "
          f"{got[0]:016x}, {got[1]:,} samples = the sources' ({time.perf_counter() - t:.0f} s)")


def check_windows(order: EpochOrder, rng, windows: int) -> None:
    """1a: sampled whole windows hold exactly the samples of the block-order positions they cover."""
    t = time.perf_counter()
    picks = rng.integers(0, order.windows - 8, windows // 8)
    runs = [(0, 1), (order.windows - 1, order.windows)] + [(int(w), int(w) + 8) for w in picks]
    checked = 0
    for a, b in runs:
        lo, hi = a * order.span, min(b * order.span, order.size)
        got = order.slice(lo, hi)
        slot, offset = order.locate(np.array([lo, hi - 1]))
        first, count = order.blocks_at(np.arange(slot[0], slot[1] + 1))
        want = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)])
        want = want[offset[0]:len(want) - (count[-1] - offset[1] - 1)]
        assert len(np.unique(got)) == len(got) == hi - lo
        assert np.array_equal(np.sort(got), np.sort(want)), f"windows [{a}, {b}) do not hold their blocks"
        checked += hi - lo
    print(f"PASS exactly once (samples, sampled): {len(runs) - 2} runs of 8 random windows + first + last "
          f"window, {checked:,} positions, each run = its blocks' samples ({time.perf_counter() - t:.0f} s)")


def check_injective(order: EpochOrder, rng, n: int) -> None:
    """1b: uniformly drawn positions collide on a sample only where they are the same position."""
    t = time.perf_counter()
    pos = rng.integers(0, order.size, n)
    samples = np.concatenate([order.at(p) for p in np.array_split(pos, max(1, n // 2_000_000))])
    pairs = np.unique(np.stack([samples, pos]), axis=1)  # distinct (sample, position) pairs
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pos)), "two positions share a sample"
    assert samples.min() >= 0 and samples.max() < order.size
    print(f"PASS exactly once (samples, sampled): {n:,} uniform positions over the epoch "
          f"({n - len(np.unique(pos)):,} repeated positions), no two positions share a sample "
          f"({time.perf_counter() - t:.0f} s)")


def global_batch_of(order, consumed, g, world) -> np.ndarray:
    return np.concatenate([plan_rank_step(order, consumed, g, r, world) for r in range(world)])


def check_dealing(order: EpochOrder, rng, order_args: dict) -> None:
    """2: equal batches per rank; the ranks' plans make up the step's global batch."""
    t = time.perf_counter()
    for world in (512, 1024, 2048, 4096):
        g = PER_RANK * world
        steps = steps_per_epoch(order, g)
        for step in [0, steps - 1, *rng.integers(1, steps - 1, 8)]:
            parts = [plan_rank_step(order, int(step) * g, g, r, world) for r in range(world)]
            assert {len(p) for p in parts} == {PER_RANK}
            assert np.array_equal(np.concatenate(parts), order.slice(int(step) * g, (int(step) + 1) * g))
        print(f"PASS equal batches: {world} ranks x {WORKERS} workers, {steps:,} steps of {g:,}, all ranks "
              f"at 10 steps (first, last, 8 random): {PER_RANK} samples each, together the global batch")
    # The loader's workers: micro-batch i of a rank is built by worker i % 8, each in its own process
    # with its own EpochOrder; handed back round-robin they must be the rank's plan.
    world, g = 4096, PER_RANK * 4096
    workers = [EpochOrder(order_args["ranges"], seed=order.seed, epoch=order.epoch, block=BLOCK, window=WINDOW)
               for _ in range(WORKERS)]
    first = int(rng.integers(0, steps_per_epoch(order, g) - 16))
    for rank in rng.choice(world, 8, replace=False):
        for i, step in enumerate(range(first, first + 16)):
            got = plan_rank_step(workers[i % WORKERS], step * g, g, int(rank), world)
            assert np.array_equal(got, plan_rank_step(order, step * g, g, int(rank), world))
    print(f"PASS workers: 8 random ranks of 4096, 16 steps from step {first:,}, each step planned by worker "
          f"step % {WORKERS} on its own EpochOrder: the same batches")
    print(f"   ({time.perf_counter() - t:.0f} s)")


def check_resume(order: EpochOrder, ranges, rng) -> int:
    """3: a 4,096-rank cursor resumed on 3,968 ranks; returns the cursor's size in bytes."""
    t = time.perf_counter()
    old, new = 4096, 3968
    g_old, g_new = PER_RANK * old, PER_RANK * new
    stop = int(rng.integers(2, steps_per_epoch(order, g_old) - 2))
    text = json.dumps(cursor_state(order.epoch, stop * g_old))
    state = json.loads(text)
    check_order_version(state)  # refuses a cursor of another order (tested in tests/unit/test_order.py)
    resumed = EpochOrder(ranges, seed=order.seed, epoch=state["epoch"], block=BLOCK, window=WINDOW)
    consumed = state["consumed"]
    # NOTE: steps count on from the cursor: step k after resuming takes [consumed + k*G', ...).
    before = [global_batch_of(order, s * g_old, g_old, old) for s in (stop - 2, stop - 1)]
    after = [global_batch_of(resumed, consumed + k * g_new, g_new, new) for k in range(3)]
    joined = np.concatenate(before + after)
    assert np.array_equal(joined, order.slice(consumed - 2 * g_old, consumed + 3 * g_new)), "gap or overlap"
    assert len(np.unique(joined)) == len(joined), "a sample repeated across the resume"
    left = steps_per_epoch(resumed, g_new, consumed)
    for k in [left - 1, *rng.integers(3, left - 1, 15)]:
        for r in rng.choice(new, 64, replace=False):
            plan = plan_rank_step(resumed, consumed + int(k) * g_new, g_new, int(r), new)
            assert len(plan) == PER_RANK and len(np.unique(plan)) == PER_RANK
    dropped = resumed.size - consumed - left * g_new
    assert 0 <= dropped < g_new
    print(f"PASS resume: cursor at step {stop:,} of {old} ranks (consumed {consumed:,}) -> {new} ranks, "
          f"{left:,} steps of {g_new:,} left; all ranks of the 2 steps before + 3 after: contiguous, "
          f"no sample repeated; 64 ranks x 16 later steps (incl. the last) full; {dropped:,} samples dropped at the "
          f"epoch's end (< one global batch) ({time.perf_counter() - t:.0f} s)")
    return len(text.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=16_000)
    ap.add_argument("--sampled-positions", type=int, default=8_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    counts, ranges = make_shards(rng)
    sources, lo = [], 0
    for name, target in SOURCES:
        n = int(round(target / 9_860))  # as make_shards
        sources.append(Counted([f"s3://laion5b/{name}/{i:06d}.tar" for i in range(n)], counts[lo:lo + n].tolist()))
        lo += n
    tracemalloc.start()
    shard_set = ShardSet(sources)  # what every process holds of the data (rank 0 builds it, all receive it)
    t = time.perf_counter()
    order = EpochOrder(shard_set.source_ranges(), seed=args.seed, epoch=0, block=BLOCK, window=WINDOW)
    built = time.perf_counter() - t
    state_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del sources
    assert shard_set.source_ranges() == ranges
    offsets = shard_set.offsets
    broadcast = len(pickle.dumps(shard_set))
    print(f"{len(counts):,} shards ({int((counts == 0).sum()):,} empty, {counts.min()}-{counts.max()} samples), "
          f"{order.size:,} samples in {len(ranges)} sources; block {BLOCK}, window {WINDOW}; order built in "
          f"{built * 1e3:.1f} ms")
    assert order.size == int(offsets[-1])

    check_blocks(order, ranges)
    check_windows(order, rng, args.windows)
    check_injective(order, rng, args.sampled_positions)
    check_dealing(order, rng, {"ranges": ranges})
    cursor = check_resume(order, ranges, rng)

    g = PER_RANK * 4096
    steps = steps_per_epoch(order, g)
    times = []
    for _ in range(200):
        step, rank = int(rng.integers(0, steps)), int(rng.integers(0, 4096))
        t = time.perf_counter()
        idx = plan_rank_step(order, step * g, g, rank, 4096)
        located = [shard_set.locate(i) for i in idx]
        times.append(time.perf_counter() - t)
        assert all(position < counts[shard] for shard, position in located)
    per_shard = state_bytes / len(counts)
    print(f"cursor: {cursor} bytes of JSON ({json.dumps(cursor_state(0, steps * g))!r} at the largest)")
    print(f"global data state per process: {state_bytes:,} bytes = {per_shard:.1f} bytes/shard "
          f"(ShardSet: URLs {shard_set.urls.nbytes():,} + counts {offsets.nbytes:,}; order {order.state_bytes():,}); "
          f"its broadcast from rank 0: {broadcast:,} bytes pickled; v1 would hold "
          f"{order.size * 8 / 2**30:.0f} GiB of permutation per worker and a Python `Sample` (935 bytes) per sample")
    print(f"plan one rank's step ({PER_RANK} samples, 4,096 ranks, with shard lookup): median "
          f"{np.median(times) * 1e6:.0f} us, max {max(times) * 1e6:.0f} us")
    assert cursor < 1024 and per_shard < 64
    print(f"PASS cursor < 1 kB, global state < 64 bytes/shard; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
