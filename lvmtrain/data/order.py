"""The epoch order as a function: any slice of it in time and memory proportional to the slice.

Version 1 (`epoch_order`, before this module) materialised the whole epoch's permutation in every
loader worker (44 GB for LAION-5B's 5.85B samples). `EpochOrder` keeps the same semantics (blocks of consecutive samples,
weighted sources, every block permuted together, samples shuffled inside windows of blocks; no
dependence on the world size) but computes position -> global sample index on demand:

1. Virtual blocks. Source s of weight w is cut into nb_s blocks of `block` samples (its last may
   be short). The epoch's blocks are enumerated as segments: floor(w) "copy" segments of all nb_s
   blocks, then a "share" segment of round(frac(w) * nb_s) blocks: the first ones of a keyed
   permutation of the source's blocks (keyed by seed, epoch, source: another share each epoch).
   A virtual block id is a segment start plus an index in the segment: no per-block array.
2. Slots. A keyed permutation over the V virtual blocks puts virtual block P(j) in slot j; slots
   are laid out back to back. Every block fills `block` positions except each source's short last
   block (at most one per segment, so a few per epoch): their slots are found once with the
   inverse permutation and kept sorted with the running deficit, so position -> (slot, offset) is
   one `searchsorted` over those few slots. The epoch has exactly V*block - sum(deficits)
   samples: its length is defined here (`size`), whatever the block sizes.
3. Windows. Positions are cut into windows of `window * block` positions (the last may be short)
   and position p of window w reads block-order position w*span + Q_w(p - w*span), Q_w a keyed
   permutation of the window (keyed by seed, epoch, w), exactly like shuffling each window of
   the concatenated blocks. Only the positions of the slice are evaluated, not whole windows.

Every permutation is a keyed pseudo-random permutation (PRP) over [0, n): an alternating Feistel
network on the next power of two >= n, with cycle walking (re-encrypt until the value is < n),
which is a bijection of [0, n) for any key and n; see `Prp`. All of it is vectorised numpy uint64.

Deviations from version 1: the exact order differs (another generator);
a short block is placed by the block permutation like any other, and windows are cut by
position as before, so a window may start inside a block. The epoch length is exact (v1's
`epoch_size` under-counted when a fractional share held a source's short last block). Kept: each
block of a source floor(w) or floor(w)+1 times per epoch as in v1, the same order for any world
size, equal batches per rank (`plan_rank_step`), a cursor of a few bytes, now carrying the
order version (`cursor_state`, `check_order_version`).

Global state: O(sources) integers (segments and short blocks), a few hundred bytes; samples are
located by the caller's per-shard offsets (ShardSet.offsets, 8 bytes per shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lvmtrain.data.remote import DataError

ORDER_VERSION = 2
"""1: `epoch_order` of lvmtrain <= round 2's first step (a materialised numpy permutation); 2: this
module's EpochOrder."""

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_ROUNDS = 8  # half-rounds of the alternating Feistel: 4 full Luby-Rackoff rounds
# Purposes, so that permutations with the same (seed, epoch) are unrelated.
_BLOCKS, _SHARE, _WINDOW = 1, 2, 3


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on a Python int: a bijection of 64-bit values that mixes all bits."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """`_mix_int` on a uint64 array (multiplication wraps modulo 2^64, as wanted)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, purpose, ...); each part is chained through the
    mixer, so (1, 2) and (2, 1) give unrelated keys."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _mix_int(h ^ _mix_int(int(p) + _GOLDEN))
    return h


class Prp:
    """A keyed permutation of [0, n), vectorised over arrays of inputs.

    The domain is the next power of two 2^k >= n, split into a high half of a = k//2 bits and a
    low half of b = k - a bits. Round i xors one half with F(other half, round key i), alternating;
    each round is invertible whatever F, hence the whole network is a bijection of [0, 2^k) (no
    need for balanced halves, so 2^k < 2n and cycle walking takes under 2 encryptions on average).
    Cycle walking (encrypt again while the value is >= n) restricts it to a bijection of [0, n).
    F is splitmix64's finaliser of (half + round key). `key` is an int, or a uint64 array of one
    key per input, or of distinct keys with `index` giving each input's (the per-window
    permutations of a slice are evaluated in one pass).
    """

    def __init__(self, n: int, key, index: np.ndarray | None = None):
        if n < 1:
            raise ValueError(f"a permutation needs a non-empty domain, not n={n}")
        self.n = int(n)
        k = max(1, (self.n - 1).bit_length())
        self.b = k - k // 2
        self.mask_a = np.uint64((1 << (k // 2)) - 1)
        self.mask_b = np.uint64((1 << self.b) - 1)
        if isinstance(key, np.ndarray):
            key = key.astype(np.uint64)
            # `index` picks input i's key as key[index[i]]: round keys are mixed once per distinct key.
            self.round_keys = [_mix(key + np.uint64((i + 1) * _GOLDEN & _MASK)) for i in range(_ROUNDS)]
            if index is not None:
                self.round_keys = [k[index] for k in self.round_keys]
        else:
            self.round_keys = [np.uint64(_mix_int(int(key) + (i + 1) * _GOLDEN)) for i in range(_ROUNDS)]

    def _rounds(self, x: np.ndarray, keys: list, order) -> np.ndarray:
        shift = np.uint64(self.b)
        hi, lo = x >> shift, x & self.mask_b
        for i in order:
            if i % 2 == 0:
                hi = hi ^ (_mix(lo + keys[i]) & self.mask_a)
            else:
                lo = lo ^ (_mix(hi + keys[i]) & self.mask_b)
        return (hi << shift) | lo

    def _walk(self, x, order) -> np.ndarray:
        x = np.asarray(x).astype(np.uint64)
        scalar = x.ndim == 0
        x = np.atleast_1d(x)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"input outside [0, {self.n})")
        per_input = isinstance(self.round_keys[0], np.ndarray) and self.round_keys[0].ndim
        keys = [np.broadcast_to(k, x.shape) for k in self.round_keys] if per_input else self.round_keys
        y = self._rounds(x, keys, order)
        todo = np.flatnonzero(y >= np.uint64(self.n))
        while todo.size:  # cycle walking: follow the cycle until it comes back into [0, n)
            sub = [k[todo] for k in keys] if per_input else keys
            y[todo] = self._rounds(y[todo], sub, order)
            todo = todo[y[todo] >= np.uint64(self.n)]
        y = y.astype(np.int64)
        return y[0] if scalar else y

    def __call__(self, x) -> np.ndarray:
        return self._walk(x, range(_ROUNDS))

    def inverse(self, y) -> np.ndarray:
        return self._walk(y, range(_ROUNDS - 1, -1, -1))


class EpochOrder:
    """Epoch `epoch`'s order of global sample indices, as a function of the position.

    ranges: [lo, hi) of global sample indices per source; weights: one per source (default 1).
    Depends only on (ranges, seed, epoch, block, window, weights), never on ranks or workers.
    """

    def __init__(self, ranges: list[tuple[int, int]], *, seed: int, epoch: int, block: int, window: int,
                 weights: list[float] | None = None):
        if block < 1 or window < 1:
            raise ValueError(f"block and window must be >= 1, not {block} and {window}")
        weights = list(weights) if weights else [1.0] * len(ranges)
        if len(weights) != len(ranges) or min(weights, default=1) < 0:
            raise ValueError(f"give one weight >= 0 per source ({len(ranges)}), not {weights}")
        self.seed, self.epoch, self.block, self.window = int(seed), int(epoch), int(block), int(window)
        self.span = self.block * self.window
        # Segments: a run of virtual block ids all taken from one source, in block order (copy) or
        # through the source's share permutation (share).
        starts, lows, highs, shares, short_vids, deficits = [], [], [], [], [], []
        total = 0
        for s, ((lo, hi), w) in enumerate(zip(ranges, weights)):
            n = int(hi) - int(lo)
            nb = -(-n // self.block)
            if nb == 0:
                continue
            whole, frac = divmod(float(w), 1.0)
            tail = n - (nb - 1) * self.block  # the last block's size
            for _ in range(int(whole)):
                starts.append(total), lows.append(int(lo)), highs.append(int(hi)), shares.append(None)
                if tail < self.block:
                    short_vids.append(total + nb - 1), deficits.append(self.block - tail)
                total += nb
            count = int(round(frac * nb))  # as v1: Python's round, a fresh share every epoch
            if count:
                share = Prp(nb, derive_key(self.seed, self.epoch, _SHARE, s))
                starts.append(total), lows.append(int(lo)), highs.append(int(hi)), shares.append(share)
                k = int(share.inverse(nb - 1))  # where the short block falls in the share's order
                if tail < self.block and k < count:
                    short_vids.append(total + k), deficits.append(self.block - tail)
                total += count
        self.blocks = total
        self.seg_start = np.array(starts, dtype=np.int64)
        self.seg_low = np.array(lows, dtype=np.int64)
        self.seg_high = np.array(highs, dtype=np.int64)
        self.seg_share = shares
        self.perm = Prp(total, derive_key(self.seed, self.epoch, _BLOCKS)) if total else None
        # Short blocks, by slot: E[i] = end position of the i-th short slot, C[i] = deficit before
        # slot i+1 onwards (C[0] = 0). A position p with i = #{E <= p} maps to p + C[i] in the
        # grid where every slot is `block` long.
        slots = self.perm.inverse(np.array(short_vids, dtype=np.int64)) if short_vids else np.zeros(0, np.int64)
        by_slot = np.argsort(slots, kind="stable")
        self.short_slots = slots[by_slot]
        self.deficit = np.concatenate([[0], np.cumsum(np.array(deficits, dtype=np.int64)[by_slot])]).astype(np.int64)
        self.short_end = (self.short_slots + 1) * self.block - self.deficit[1:]
        self.size = total * self.block - int(self.deficit[-1])
        self.windows = -(-self.size // self.span)
        self._window_key = derive_key(self.seed, self.epoch, _WINDOW)

    def state_bytes(self) -> int:
        """Bytes of this order's global state (arrays and round keys; not Python object headers)."""
        arrays = [self.seg_start, self.seg_low, self.seg_high, self.short_slots, self.deficit, self.short_end]
        prps = [p for p in [self.perm, *self.seg_share] if p is not None]
        return sum(a.nbytes for a in arrays) + sum(8 * len(p.round_keys) + 24 for p in prps)

    def __len__(self) -> int:
        return self.size

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Global sample indices at positions [start, stop) of the epoch's order (int64)."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"slice [{start}, {stop}) outside the epoch's {self.size} positions")
        return self.at(np.arange(start, stop, dtype=np.int64))

    def at(self, positions) -> np.ndarray:
        """Global sample indices at an array of positions (any order, repeats allowed)."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size == 0:
            return np.zeros(p.shape, np.int64)
        if p.min() < 0 or p.max() >= self.size:
            raise IndexError(f"positions outside the epoch's {self.size} positions")
        return self._sample(self._window_shuffle(p))

    def _window_shuffle(self, p: np.ndarray) -> np.ndarray:
        """Block-order position read by each position: w*span + Q_w(p - w*span)."""
        w = p // self.span
        local = p - w * self.span
        first, last_w = int(w.min()), int(w.max())
        if last_w - first < p.size:  # a slice: its windows are a short range
            ws, index = np.arange(first, last_w + 1, dtype=np.int64), w - first
        else:  # scattered positions
            ws, index = np.unique(w, return_inverse=True)
        keys = _mix(ws.astype(np.uint64) + np.uint64(self._window_key))
        last_len = self.size - (self.windows - 1) * self.span  # the last window may be short
        if last_w < self.windows - 1 or last_len == self.span:
            return p - local + Prp(self.span, keys, index)(local)
        out = np.empty_like(p)
        is_last = w == self.windows - 1
        for group, n in ((~is_last, self.span), (is_last, last_len)):
            if group.any():
                out[group] = Prp(n, keys, index[group])(local[group])
        return p - local + out

    def _sample(self, q: np.ndarray) -> np.ndarray:
        """Sample index at block-order position q (before the window shuffle)."""
        slot, offset = self.locate(q)
        first, _ = self.blocks_at(slot)
        return first + offset

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, offset in its block) of block-order positions q."""
        grid = q + self.deficit[np.searchsorted(self.short_end, q, side="right")]
        slot = grid // self.block
        return slot, grid - slot * self.block

    def blocks_at(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first global sample, sample count) of the blocks in slots (epoch block order)."""
        vid = self.perm(slots)
        seg = np.searchsorted(self.seg_start, vid, side="right") - 1
        blk = vid - self.seg_start[seg]
        for i, share in enumerate(self.seg_share):
            if share is not None:
                mine = seg == i
                if mine.any():
                    blk[mine] = share(blk[mine])
        first = self.seg_low[seg] + blk * self.block
        return first, np.minimum(self.block, self.seg_high[seg] - first)


def steps_per_epoch(order: EpochOrder, global_batch: int, consumed: int = 0) -> int:
    """Optimizer steps left in the epoch after `consumed` positions; the last partial global batch
    is dropped (fewer than G samples, so every rank gets the same number of batches)."""
    return (order.size - consumed) // global_batch


def step_positions(consumed: int, global_batch: int, rank: int, world: int, accum: int = 1) -> np.ndarray:
    """Epoch positions rank `rank` of `world` trains on at the step that starts after `consumed`
    positions (the cursor), as the loader deals them: micro-batch m takes the b = G/(world*accum)
    positions at consumed + (m*world + rank)*b (with accum = 1: the rank's contiguous share of the
    global batch). `consumed` need not be a multiple of G: after a resume onto another world size
    it is a multiple of the old one's."""
    if global_batch % (world * accum) or not 0 <= rank < world:
        raise ValueError(f"global batch {global_batch} is not dealt to rank {rank} of {world} x {accum} micro-steps")
    b = global_batch // (world * accum)
    firsts = consumed + (np.arange(accum, dtype=np.int64) * world + rank) * b
    return (firsts[:, None] + np.arange(b, dtype=np.int64)).reshape(-1)


def plan_rank_step(order: EpochOrder, consumed: int, global_batch: int, rank: int, world: int,
                   accum: int = 1) -> np.ndarray:
    """Global sample indices of rank `rank` at the step after `consumed` positions of the epoch
    (step t of an uninterrupted epoch: consumed = t*G); reshape(accum, -1) for the micro-batches.
    Costs O(G / world) whatever the epoch size; every rank gets the same count."""
    if not 0 <= consumed <= order.size - global_batch:
        raise IndexError(f"no whole global batch of {global_batch} after position {consumed} of the epoch's "
                         f"{order.size}")
    return order.at(step_positions(consumed, global_batch, rank, world, accum))


class OrderVersionError(DataError):
    """A data cursor written under another epoch order."""


def cursor_state(epoch: int, consumed: int) -> dict:
    """A cursor's state with the order version that gives `consumed` its meaning."""
    return {"epoch": int(epoch), "consumed": int(consumed), "order": ORDER_VERSION}


def check_order_version(saved) -> None:
    """Refuse a cursor (its state dict, or its version) made with another epoch order.

    `consumed` counts positions of one particular order: under another, resuming would neither
    skip what was seen nor show what was not, silently. A state without "order" predates the
    versioning and was made with version 1. NOTE: a cursor at the start of an epoch (consumed 0)
    means the same under every order (no epoch is split), so it is accepted.
    """
    version = saved.get("order", 1) if isinstance(saved, dict) else saved
    if isinstance(saved, dict) and int(saved.get("consumed", -1)) == 0:
        return
    if version != ORDER_VERSION:
        raise OrderVersionError(
            f"the checkpoint's data cursor was made with epoch order version {version}, but this lvmtrain "
            f"uses version {ORDER_VERSION}: its position means other samples under this order, so resuming "
            f"would silently repeat some data and skip other. Resume with the lvmtrain release that wrote the "
            f"checkpoint, or start the data position afresh on purpose (a new run).")


@dataclass
class Cursor:
    """The data position: `consumed` positions of epoch `epoch`'s order have been trained on; its
    state carries the order version that gives `consumed` its meaning."""

    epoch: int = 0
    consumed: int = 0

    def state_dict(self) -> dict:
        return cursor_state(self.epoch, self.consumed)

    @classmethod
    def from_state(cls, state: dict) -> Cursor:
        check_order_version(state)
        return cls(int(state["epoch"]), int(state["consumed"]))
