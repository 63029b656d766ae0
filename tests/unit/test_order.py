"""The epoch order as a function (lvmtrain.data.order): the guarantees resume and DDP rely on."""

import json
import time

import numpy as np
import pytest

from lvmtrain.data.order import (ORDER_VERSION, Cursor, EpochOrder, OrderVersionError, Prp, check_order_version,
                                 cursor_state, plan_rank_step, steps_per_epoch)
from lvmtrain.data.shards import DataError

# Uneven sources: a short last block, one shorter than a block, one exact multiple of the block.
RANGES = [(0, 1000), (1000, 1301), (1301, 1350), (1350, 1606)]


def test_prp_is_a_bijection_for_every_small_n():
    for n in list(range(1, 130)) + [255, 256, 257, 1000, 4097]:
        for key in (0, 1, 2**63 + 5):
            p = Prp(n, key)
            y = p(np.arange(n))
            assert np.array_equal(np.sort(y), np.arange(n)), (n, key)
            assert np.array_equal(p.inverse(y), np.arange(n))
    assert not np.array_equal(Prp(1000, 1)(np.arange(1000)), Prp(1000, 2)(np.arange(1000)))


def test_prp_with_one_key_per_input_is_the_keyed_prp_of_each():
    keys = np.array([3, 9, 2**64 - 1], dtype=np.uint64)
    index = np.repeat(np.arange(3), 50)
    x = np.tile(np.arange(50), 3)
    y = Prp(50, keys, index)(x)
    for i, k in enumerate(keys):
        assert np.array_equal(y[index == i], Prp(50, keys[i:i + 1], np.zeros(50, int))(np.arange(50)))
        assert np.array_equal(np.sort(y[index == i]), np.arange(50))


def block_counts(order: np.ndarray, ranges, block: int):
    """{(source, block index): times seen}, asserting each block is seen whole each time."""
    counts = np.bincount(order, minlength=ranges[-1][1])
    out = {}
    for s, (lo, hi) in enumerate(ranges):
        for b, start in enumerate(range(lo, hi, block)):
            seen = counts[start:min(start + block, hi)]
            assert (seen == seen[0]).all(), f"block {b} of source {s} seen partly: {seen}"
            out[s, b] = int(seen[0])
    return out


@pytest.mark.parametrize("block,window", [(64, 4), (16, 3), (7, 1), (1, 5), (100, 2)])
@pytest.mark.parametrize("weights", [None, [1, 2, 0.5, 1.5], [0.25, 1, 3, 0.5]])
def test_the_epoch_holds_the_multiset_the_weights_ask_for(block, window, weights):
    w = weights or [1.0] * len(RANGES)
    shares = []
    for epoch in range(3):
        order = EpochOrder(RANGES, seed=4, epoch=epoch, block=block, window=window, weights=weights)
        full = order.slice(0, order.size)
        assert full.dtype == np.int64 and len(full) == order.size
        counts = block_counts(full, RANGES, block)
        expected = 0
        for s, (lo, hi) in enumerate(RANGES):
            nb = -(-(hi - lo) // block)
            whole, frac = divmod(w[s], 1.0)
            seen = [counts[s, b] for b in range(nb)]
            assert set(seen) <= {int(whole), int(whole) + 1}
            assert sum(c - int(whole) for c in seen) == int(round(frac * nb))
            expected += sum(c * min(block, hi - lo - b * block) for b, c in enumerate(seen))
            if frac:
                shares.append((epoch, s, tuple(seen)))
        assert order.size == expected
    # a different share each epoch (for the sources with enough blocks to tell)
    for s in {s for _, s, _ in shares}:
        per_epoch = [seen for _, src, seen in shares if src == s]
        if len(per_epoch[0]) >= 8:
            assert len(set(per_epoch)) > 1, f"source {s} shows the same share every epoch"


def test_slices_anywhere_equal_the_full_order():
    order = EpochOrder(RANGES, seed=1, epoch=2, block=16, window=3, weights=[1, 2, 0.5, 1.5])
    full = order.slice(0, order.size)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, order.size, 30))
    pieces = [order.slice(a, b) for a, b in zip([0, *cuts], [*cuts, order.size])]
    assert np.array_equal(np.concatenate(pieces), full)
    positions = rng.integers(0, order.size, 500)
    assert np.array_equal(order.at(positions), full[positions])
    with pytest.raises(IndexError):
        order.slice(0, order.size + 1)


def test_the_order_is_seeded_by_seed_and_epoch_only():
    def make(seed, epoch):
        return EpochOrder(RANGES, seed=seed, epoch=epoch, block=16, window=4).slice(0, 1606)

    a = make(1, 0)
    assert np.array_equal(np.sort(a), np.arange(1606))
    assert np.array_equal(a, make(1, 0))
    assert not np.array_equal(a, make(1, 1))
    assert not np.array_equal(a, make(2, 0))
    # shuffled: consecutive positions are rarely consecutive samples, a window mixes its blocks
    assert np.mean(np.diff(a) == 1) < 0.05


def test_every_rank_gets_equal_batches_and_a_step_is_the_global_batch():
    order = EpochOrder(RANGES, seed=0, epoch=0, block=16, window=4, weights=[1, 2, 0.5, 1.5])
    g = 48
    steps = steps_per_epoch(order, g)
    assert steps == order.size // g
    for world, accum in [(1, 1), (3, 1), (4, 2), (8, 2), (12, 1)]:
        for step in range(steps):
            parts = [plan_rank_step(order, step * g, g, r, world, accum) for r in range(world)]
            assert {len(p) for p in parts} == {g // world}
            micro = np.stack([p.reshape(accum, -1) for p in parts], axis=1).reshape(-1)
            assert np.array_equal(micro, order.slice(step * g, (step + 1) * g))
    with pytest.raises(IndexError):
        plan_rank_step(order, steps * g, g, 0, 1)
    with pytest.raises(ValueError):
        plan_rank_step(order, 0, g, 0, 5)


@pytest.mark.parametrize("old,new,per_rank", [(4, 3, 12), (2, 6, 8), (8, 1, 48), (4, 3, 16), (6, 4, 8)])
def test_resume_onto_another_world_size_loses_and_repeats_nothing(old, new, per_rank):
    """Same global batch (per_rank * new == 48): the same global batches as without the resume;
    another one (a lost node, same per-rank batch): the positions still run on without a gap."""
    weights = [1, 2, 0.5, 1.5]
    order = EpochOrder(RANGES, seed=7, epoch=1, block=16, window=4, weights=weights)
    g_old, g_new = 48, per_rank * new

    def run(o, consumed, g, world):
        batches = []
        while steps_per_epoch(o, g, consumed):
            batches.append(np.concatenate([plan_rank_step(o, consumed, g, r, world) for r in range(world)]))
            consumed += g
        return batches

    uninterrupted = run(order, 0, g_old, old)
    rng = np.random.default_rng(old * 10 + new)
    for stop in rng.integers(0, len(uninterrupted), 5):
        cursor = json.loads(json.dumps(cursor_state(1, int(stop) * g_old)))
        check_order_version(cursor)
        resumed = EpochOrder(RANGES, seed=7, epoch=cursor["epoch"], block=16, window=4, weights=weights)
        after = run(resumed, cursor["consumed"], g_new, new)
        seen = np.concatenate(uninterrupted[:stop] + after)
        assert np.array_equal(seen, order.slice(0, len(seen)))  # nothing skipped or repeated
        assert order.size - len(seen) < g_new  # only the last partial global batch is dropped
        if g_new == g_old:
            assert all(np.array_equal(a, b) for a, b in zip(uninterrupted[stop:], after))
            assert len(after) == len(uninterrupted) - stop


def test_a_slice_costs_the_same_whatever_the_epoch_size():
    laion = [(0, 2_320_000_000), (2_320_000_000, 4_580_000_000), (4_580_000_000, 5_850_000_123)]
    t = time.perf_counter()
    order = EpochOrder(laion, seed=0, epoch=3, block=64, window=4, weights=[1, 1.5, 0.5])
    part = order.slice(4_000_000_000, 4_000_001_000)
    took = time.perf_counter() - t
    assert took < 1.0, f"a 1,000-position slice of a 5.85e9-sample order took {took:.2f} s"
    assert order.state_bytes() < 1024
    assert len(np.unique(part)) == 1000 and part.min() >= 0 and part.max() < 5_850_000_123
    assert np.array_equal(part[:10], order.slice(4_000_000_000, 4_000_000_010))


def test_a_cursor_of_another_order_version_is_refused():
    state = cursor_state(2, 4096)
    assert len(json.dumps(state)) < 100
    check_order_version(state)
    check_order_version(ORDER_VERSION)
    for old in ({"epoch": 2, "consumed": 4096}, {"epoch": 0, "consumed": 8, "order": ORDER_VERSION + 1}, 1):
        with pytest.raises(OrderVersionError, match="epoch order version .* silently") as e:
            check_order_version(old)
        assert isinstance(e.value, DataError)
    # at the start of an epoch no epoch is split: any order's cursor means the same
    assert Cursor.from_state({"epoch": 3, "consumed": 0}) == Cursor(3, 0)
    assert Cursor.from_state(Cursor(2, 4096).state_dict()) == Cursor(2, 4096)
    with pytest.raises(OrderVersionError):
        Cursor.from_state({"epoch": 2, "consumed": 4096})
