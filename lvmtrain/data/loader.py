"""Indexed WebDataset shards -> decoded, transformed batches for one rank.

Micro-batch i of this rank is built by DataLoader worker i % workers; the DataLoader hands worker
outputs back round-robin, so batches arrive in order and the stream is the same for any worker
count. Each training batch carries the cursor *after* it, so the trainer always knows the exact
data position of the step it just took, whatever the prefetch depth.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lvmtrain.data.batch import Batch
from lvmtrain.data.multicrop import MultiCropTransform
from lvmtrain.data.order import Cursor, EpochOrder
from lvmtrain.data.sample import BadSample, Fields, read_sample
from lvmtrain.data.shards import DataError, RemoteIO, ShardReader, ShardSet
from lvmtrain.data.transforms import ImageTransform, augment_uniforms, decode_rgb_array
from lvmtrain.preemption import ignore_stop_signals


class _SampleDecoder:
    def __init__(self, shards: ShardSet, fields: Fields, transform: ImageTransform | MultiCropTransform,
                 tokenizer=None, io: RemoteIO | None = None):
        self.shards = shards
        self.fields = fields
        self.transform = transform
        self.views = isinstance(transform, MultiCropTransform)
        self.sizes = transform.sizes if self.views else (transform.image_size,)
        self.tokenizer = tokenizer
        self.io = io
        self.reader: ShardReader | None = None
        self.buffers: SharedBuffers | None = None

    def __call__(self, index: int, uniforms=None, out: np.ndarray | list[np.ndarray] | None = None) -> dict:
        """Decode sample `index`, its image (or its multi-crop views: a list) into `out` when given,
        else into "image"; `uniforms` drive the training augmentation. A sample that cannot be
        used raises `BadSample` with its kind (`read_sample` decides)."""
        if self.reader is None:
            self.reader = ShardReader(io=self.io)
        url, sample, problem = self.shards.sample(index)
        if sample is None:
            if problem is not None and problem[0] == "unreadable_shard":
                raise BadSample("unreadable_sample", url, f"#{index}", problem[1].removeprefix(f"{url}: "))
            raise BadSample("missing_sample", url, f"#{index}", "the shard holds fewer samples than its count")
        try:
            decoded = read_sample(sample, url, lambda offset, size: self.reader.read(url, offset, size), self.fields,
                                  lambda data: self.transform(decode_rgb_array(data), uniforms, out))
        except OSError as e:  # RemoteReadError is one
            # NOTE: after io_retries, or a local shard cut short or replaced under a running job:
            # skipped and counted like any unusable sample, so one dead object costs its samples,
            # while a dead server or disk soon fills a whole batch (a DataError) or the
            # data.max_bad_fraction budget, and stops the run with this message.
            raise BadSample("unreadable_sample", url, sample.key, str(e).removeprefix(f"{url}: ")) from None
        if out is not None:
            del decoded["image"]
        decoded["shard"], decoded["index"] = url, index
        return decoded

    def hold_blocks(self, indices, slack: int = 16 << 10) -> None:
        """Read each run of consecutive samples of a shard among `indices` with one range request;
        `reader.release()` frees them. A run whose span holds more unused bytes (other members,
        tar headers and padding) than its used ones plus `slack` per sample is read sample by
        sample instead."""
        if self.reader is None:
            self.reader = ShardReader(io=self.io)
        located = sorted(self.shards.locate(int(i)) for i in indices)
        run: list[tuple[int, int]] = []
        for item in located + [(-1, -1)]:
            if run and (item[0] != run[-1][0] or item[1] != run[-1][1] + 1):
                shard = run[0][0]
                table = self.shards.table(shard)
                positions = [p for _, p in run if p < len(table)]
                if len(positions) > 1:
                    first, end, used = table.span(positions)
                    if end - first - used <= used + slack * len(positions):
                        try:
                            self.reader.hold(self.shards.urls[shard], first, end)
                        except OSError:  # each sample's own read meets it, and reports it
                            pass
                run = []
            run.append(item)

    def batch(self, indices, uniforms=None, *, fill: bool = True) -> Batch:
        """Decode and collate, each image (or view) straight into its slot of a shared batch buffer;
        bad samples are counted and reported. With `fill` (training) their slots take copies of good
        samples of the same batch (the j-th bad slot the j-th good sample, cyclically), so
        batches stay full and depend only on the data and the order."""
        if self.buffers is None:
            self.buffers = SharedBuffers()
        images, release = self._buffers(len(indices))
        slots = [b.numpy() for b in images]
        good, bad = [], []
        self.hold_blocks(indices)
        try:
            for n, i in enumerate(indices):
                try:
                    out = [s[len(good)] for s in slots] if self.views else slots[0][len(good)]
                    good.append(self(int(i), None if uniforms is None else uniforms[n], out))
                except BadSample as e:
                    bad.append(e)
                    _report(e)
        finally:
            self.reader.release()
        if not good:
            raise DataError(f"every sample of a batch is unusable (first: {bad[0]}); "
                            "run `lvmtrain data check` on these shards")
        samples = good + [good[j % len(good)] for j in range(len(bad) if fill else 0)]
        for j in range(len(good), len(samples)):
            for s in slots:
                s[j] = s[j - len(good)]
        images = [b[:len(samples)] for b in images]
        return Batch(image=images[0], views=images if self.views else None,
                     keys=[s["key"] for s in good], shards=[s["shard"] for s in good],
                     skipped=[{"key": e.key, "shard": e.shard, "kind": e.kind} for e in bad],
                     text=self.tokenizer([s["text"] for s in samples]) if self.tokenizer and self.fields.caption else None,
                     captions=[s["text"] for s in samples] if self.fields.caption and not self.tokenizer else None,
                     label=torch.tensor([s["label"] for s in samples]) if self.fields.label else None,
                     index=torch.tensor([s["index"] for s in samples], dtype=torch.int64), release_buffer=release)

    def _buffers(self, n: int) -> tuple[list[torch.Tensor], _Release | None]:
        """[n, size, size, 3] uint8 tensors, one per view size (one: the image), carved out of one
        shared buffer: views[0] is the image."""
        flat, release = self.buffers.take((n * sum(3 * s * s for s in self.sizes),))
        bounds = np.cumsum([0] + [n * 3 * s * s for s in self.sizes]).tolist()
        return [flat[lo:hi].view(n, s, s, 3) for lo, hi, s in zip(bounds, bounds[1:], self.sizes)], release

    def empty_batch(self) -> Batch:
        """A batch of no samples (evaluation padding), shaped like the others."""
        side = self.transform.image_size
        return Batch(image=torch.empty((0, side, side, 3), dtype=torch.uint8), keys=[], shards=[],
                     label=torch.empty(0, dtype=torch.long) if self.fields.label else None,
                     text=self.tokenizer([]) if self.tokenizer and self.fields.caption else None,
                     captions=[] if self.fields.caption and not self.tokenizer else None,
                     index=torch.empty(0, dtype=torch.int64))


class SharedBuffers:
    """A ring of image buffers in shared memory (a batch's image and views share one), reused once
    the consumer has released them.

    A fresh shared-memory batch costs a DataLoader worker ~7 ms per 50 images at 224 px (new
    segment, page faults), as much as decoding 20 of them; a reused one ~0.7 ms. The consumer
    calls `Batch.release()` once it has copied the images out (the trainer does after
    normalising them); a buffer still in use is never overwritten: the ring then hands out a
    fresh one, so a consumer that never releases only loses the speed-up.
    """

    def __init__(self, size: int = 8):
        # NOTE: DataLoader keeps prefetch_factor (4) batches per worker in flight and the trainer
        # holds up to grad_accum_steps more; beyond that a fresh buffer is used, so this only
        # bounds the shared memory kept, at about 2x what the DataLoader holds anyway.
        self.size = size
        self.shared = get_worker_info() is not None
        self.shape: tuple | None = None

    def take(self, shape: tuple) -> tuple[torch.Tensor, _Release | None]:
        if not self.shared:  # in the training process itself: nothing crosses a process boundary
            return torch.empty(shape, dtype=torch.uint8), None
        if shape != self.shape:
            # NOTE: new flags too, so a late release of an old buffer cannot free a new one.
            self.shape, self.next, self.pool = shape, 0, []
            self.in_use = torch.zeros(self.size, dtype=torch.int32).share_memory_()
        for _ in range(self.size):
            slot, self.next = self.next, (self.next + 1) % self.size
            if slot == len(self.pool):
                self.pool.append(torch.empty(shape, dtype=torch.uint8).share_memory_())
            if not self.in_use[slot]:
                self.in_use[slot] = 1
                return self.pool[slot], _Release(self.in_use, slot)
        return torch.empty(shape, dtype=torch.uint8).share_memory_(), None


class _Release:
    """The handle a batch carries back to its buffer; a plain object, so DataLoader's pin-memory
    thread (which copies tensors) passes it through untouched."""

    def __init__(self, flags: torch.Tensor, slot: int):
        self.flags, self.slot = flags, slot

    def __call__(self) -> None:
        self.flags[self.slot] = 0


_REPORTED = [0]
MAX_REPORTS = 20


def _report(e: BadSample) -> None:
    """Name the first bad samples of a worker on stderr; the rest are only counted."""
    _REPORTED[0] += 1
    if _REPORTED[0] <= MAX_REPORTS:
        print(f"lvmtrain: skipping bad sample ({e.kind}): {e}", file=sys.stderr, flush=True)
        if _REPORTED[0] == MAX_REPORTS:
            print("lvmtrain: further bad samples are counted in metrics.jsonl, not printed", file=sys.stderr)


class TrainBatches(IterableDataset):
    """This rank's micro-batches from `start` on, epoch after epoch, without end.

    Optimizer step t of an epoch consumes the slice [t*G, (t+1)*G) of the epoch's order, where
    G = batch_size * world * accum; micro-step m on rank r takes the b = batch_size samples at
    t*G + (m*world + r)*b. The last partial global batch of an epoch (fewer than G samples) is
    dropped, so every rank gets the same number of batches.
    """

    def __init__(self, decoder: _SampleDecoder, *, rank: int, world: int, batch_size: int, accum: int,
                 seed: int, start: Cursor, block: int, window: int, weights: list[float] | None = None):
        self.decoder = decoder
        self.rank, self.world, self.batch_size, self.accum = rank, world, batch_size, accum
        self.seed, self.start, self.block, self.window = seed, start, block, window
        self.weights = weights or None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.accum

    def order(self, epoch: int) -> EpochOrder:
        """Epoch `epoch`'s order: any slice computed on demand, nothing per sample held; its length
        is the epoch's."""
        return EpochOrder(self.decoder.shards.source_ranges(), seed=self.seed, epoch=epoch, block=self.block,
                          window=self.window, weights=self.weights)

    def steps_per_epoch(self) -> int:
        return len(self.order(0)) // self.global_batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        g, b = self.global_batch, self.batch_size
        epoch, consumed, micro = self.start.epoch, self.start.consumed, 0
        while True:
            order = self.order(epoch)
            while len(order) - consumed >= g:
                for m in range(self.accum):
                    if micro % workers == worker:
                        lo = consumed + (m * self.world + self.rank) * b
                        indices = order.slice(lo, lo + b)
                        uniforms = augment_uniforms(self.seed, epoch, indices, self.decoder.transform.DRAWS)
                        batch = self.decoder.batch(indices, uniforms)
                        batch.cursor = (epoch, consumed + g)
                        yield batch
                    micro += 1
                consumed += g
            epoch, consumed = epoch + 1, 0


class EvalBatches(IterableDataset):
    """Every sample once, in batches of consecutive positions dealt round-robin over the ranks
    (batch b: positions b*B .. (b+1)*B - 1, on rank b % world). A sample's batch is the same
    whatever the world size, so its features are too, to the bit: a sharded evaluation decides
    exactly as one process.

    Every rank yields the same number of batches (a rank with fewer ends with empty ones): under
    sharding backends each forward is a collective that all ranks must join.
    """

    def __init__(self, decoder: _SampleDecoder, *, rank: int, world: int, batch_size: int):
        self.decoder, self.rank, self.world, self.batch_size = decoder, rank, world, batch_size
        self.n = len(decoder.shards)
        self.batches = -(-(-(-self.n // batch_size)) // world)  # ceil(ceil(n / batch_size) / world) per rank

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in range(self.batches):
            if i % workers == worker:
                lo = (i * self.world + self.rank) * self.batch_size
                hi = min(lo + self.batch_size, self.n)
                yield self.decoder.batch(range(lo, hi), fill=False) if lo < hi else self.decoder.empty_batch()


def make_loader(dataset: IterableDataset, *, workers: int, pin_memory: bool) -> DataLoader:
    # NOTE: a generator of its own: by default each `iter()` draws the workers' base seed from the
    # global RNG, which a resume restores from the checkpoint before the first `iter()`; the draw
    # would then shift every later stochastic-depth and patch-dropout mask by one (our workers draw
    # nothing from torch's RNG: augmentation hashes (seed, epoch, index)).
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if workers else None, generator=torch.Generator())


def train_order(shards: ShardSet, cfg, seed: int, epoch: int) -> EpochOrder:
    """The order of training epoch `epoch` (cfg: DataConfig), as `build_train_loader` deals it; its
    length is the epoch's."""
    return EpochOrder(shards.source_ranges(), seed=seed, epoch=epoch, block=cfg.shuffle_block,
                      window=cfg.shuffle_window, weights=cfg.train_weights or None)


def _decoder(shards: ShardSet, cfg, image_size: int, *, train: bool, fields: tuple[str, ...],
             tokenizer=None, views: tuple[int, int, int] | None = None) -> _SampleDecoder:
    """A decoder of the images and of what the task reads (`fields`: "text", "label", "views": the
    multi-crop views, of `views` = (global_size, local_size, n_local); the image is then the
    first global view)."""
    if "text" in fields and tokenizer is None:
        raise ValueError("a task that reads captions (\"text\") must give a tokenizer")
    if "views" in fields:
        if views is None or not train:
            raise ValueError("multi-crop \"views\" are for training only, and need views=(global_size, local_size, "
                             f"n_local); got train={train}, views={views}")
        transform = MultiCropTransform(*views)
    else:
        transform = ImageTransform(image_size, train=train, scale_min=cfg.crop_scale_min, hflip=cfg.hflip)
    reads_captions = "text" in fields or "captions" in fields  # "captions": as text, not tokens
    fields = Fields(image=cfg.image_key.split(";"), caption=cfg.caption_key if reads_captions else None,
                    label=cfg.label_key if "label" in fields else None)
    return _SampleDecoder(shards, fields, transform, tokenizer, RemoteIO.from_config(cfg))


def build_train_loader(shards: ShardSet, cfg, dims, *, image_size: int, fields: tuple[str, ...], tokenizer=None,
                       accum: int, seed: int, start: Cursor, views: tuple[int, int, int] | None = None) -> DataLoader:
    """This rank's training micro-batches from cursor `start` (cfg: DataConfig), with the fields a
    task reads (`Task.fields`; "views": `views` = (global_size, local_size, n_local))."""
    dataset = TrainBatches(_decoder(shards, cfg, image_size, train=True, fields=fields, tokenizer=tokenizer,
                                    views=views),
                           rank=dims.rank, world=dims.world, batch_size=cfg.batch_size, accum=accum,
                           seed=seed, start=start, block=cfg.shuffle_block, window=cfg.shuffle_window,
                           weights=cfg.train_weights)
    return make_loader(dataset, workers=cfg.workers, pin_memory=dims.device.type == "cuda")


def build_eval_loader(shards: ShardSet, cfg, dims, *, image_size: int, batch_size: int,
                      fields: tuple[str, ...] = ("label",)) -> DataLoader:
    """This rank's share of an evaluation set (cfg: DataConfig), centre-cropped, with `fields`
    ("label", "captions": the raw caption text)."""
    dataset = EvalBatches(_decoder(shards, cfg, image_size, train=False, fields=fields),
                          rank=dims.rank, world=dims.world, batch_size=batch_size)
    return make_loader(dataset, workers=cfg.workers, pin_memory=dims.device.type == "cuda")


def preflight(shards: ShardSet, cfg, *, image_size: int, fields: tuple[str, ...], tokenizer=None, first: np.ndarray,
              max_shards: int = 64, views: tuple[int, int, int] | None = None) -> str:
    """Decode, the way training will, one sample of each of the first `max_shards` shards among
    `first` (global indices the run reads first: its first batches), before step 1.

    A run whose every probe fails (a wrong data.image_key or caption_key, shards of another
    layout) stops here with the reason instead of after its first batch; some failures are
    reported and left to the per-sample budget. Only shards the run reads anyway are opened.
    Returns a one-line summary.
    """
    decoder = _decoder(shards, cfg, image_size, train=True, fields=fields, tokenizer=tokenizer, views=views)
    probes: dict[int, int] = {}
    for index in first:
        shard = shards.locate(int(index))[0]
        if len(probes) < max_shards and shard not in probes:
            probes[shard] = int(index)
    failures = []
    for index in probes.values():
        try:
            decoder(index, augment_uniforms(0, 0, [0], decoder.transform.DRAWS)[0])
        except BadSample as e:
            failures.append(e)
    if failures and len(failures) == len(probes):
        advice = ("check data.image_key / data.caption_key / data.label_key (`lvmtrain data check` lists what the "
                  "shards hold)")
        if all(e.kind in ("unreadable_sample", "missing_sample") for e in failures):
            advice = "no probed shard could be read"
        raise DataError(f"pre-flight: one sample of each of the {len(probes)} probed shards, and all are unusable, "
                        f"e.g. {failures[0]}; {advice}")
    for e in failures[:5]:
        print(f"lvmtrain: pre-flight: {e}", file=sys.stderr)
    usable = int((np.diff(shards.offsets) > 0).sum())
    return (f"pre-flight: {len(shards.urls)} shards ({usable} with samples), {len(shards):,} samples; "
            f"{len(probes) - len(failures)}/{len(probes)} probe samples decode")
