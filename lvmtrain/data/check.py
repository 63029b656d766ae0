"""Pre-flight check of a shard spec, before a run spends GPU hours finding out.

Every shard is looked at, and a bad one never stops the check: the report names each missing,
unreadable or truncated shard ("corrupt") and each remote one whose server does not answer within
the timeout and retries ("unreachable"), and says what to do, counts samples (from img2dataset's
`NNNNN_stats.json` or `lvmtrain data build`'s `_stats.json` when present, else from the tar index),
decodes the first few samples of every shard, and turns the totals into what a run on `world`
ranks will see.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from lvmtrain.data.dataset_index import is_dataset_index, read_dataset_index, stats_count
from lvmtrain.data.order import EpochOrder, steps_per_epoch
from lvmtrain.data.sample import BadSample, Fields, read_sample
from lvmtrain.data.shards import DataError, RemoteIO, RemoteReadError, Sample, ShardReader, expand_spec, local_path, scan_shard, source_parts
from lvmtrain.data.transforms import decode_rgb

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")


@dataclass
class ShardReport:
    """One shard: `status` is "ok", "missing", "corrupt" or "unreachable" (`error` says why)."""

    path: str
    status: str
    bytes: int = 0
    samples: int = 0
    """Samples the tar index found."""
    stats_samples: int | None = None
    """Samples claimed by a `_stats.json` beside the shard, when there is one."""
    count_source: str = "index"
    """Where `count` comes from: "index", or the stats file's name."""
    decoded: int = 0
    bad: int = 0
    first_bad: str = ""
    """`key: reason` of the first sample that failed to decode."""
    with_caption: int = 0
    """Decoded samples that have a caption file (valid or not: an invalid one counts as bad)."""
    with_label: int = 0
    error: str = ""

    @property
    def count(self) -> int:
        """The sample count used for the totals: the stats file's when present, else the index's."""
        return self.stats_samples if self.stats_samples is not None else self.samples

    @property
    def bad_rate(self) -> float:
        return self.bad / self.decoded if self.decoded else 0.0


@dataclass
class CheckReport:
    spec: str
    world: int
    workers: int
    batch_size: int | None
    shards: list[ShardReport]
    problems: list[str] = field(default_factory=list)
    """Shards that cannot be trained on: the CLI exits 1 when there is any."""
    warnings: list[str] = field(default_factory=list)

    def _by_status(self, status: str) -> list[ShardReport]:
        return [s for s in self.shards if s.status == status]

    @property
    def ok(self) -> int:
        return len(self._by_status("ok"))

    @property
    def missing(self) -> int:
        return len(self._by_status("missing"))

    @property
    def corrupt(self) -> int:
        return len(self._by_status("corrupt"))

    @property
    def unreachable(self) -> int:
        return len(self._by_status("unreachable"))

    @property
    def samples(self) -> int:
        """Samples in the usable shards."""
        return sum(s.count for s in self._by_status("ok"))

    @property
    def decoded(self) -> int:
        return sum(s.decoded for s in self.shards)

    @property
    def bad(self) -> int:
        return sum(s.bad for s in self.shards)

    @property
    def bad_rate(self) -> float:
        return self.bad / self.decoded if self.decoded else 0.0

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps of one epoch (no accumulation, every source of weight 1) as the epoch order
        deals them; the last partial global batch is dropped."""
        if not self.batch_size or not self.samples:
            return 0 if self.batch_size else None
        order = EpochOrder([(0, self.samples)], seed=0, epoch=0, block=64, window=4)
        return steps_per_epoch(order, self.batch_size * self.world)

    @property
    def samples_per_rank(self) -> int:
        if self.batch_size:
            return self.steps_per_epoch * self.batch_size
        return self.samples // self.world

    def totals(self) -> dict:
        return {
            "shards": len(self.shards), "ok": self.ok, "missing": self.missing, "corrupt": self.corrupt,
            "unreachable": self.unreachable, "samples": self.samples, "samples_per_rank": self.samples_per_rank,
            "steps_per_epoch": self.steps_per_epoch, "decoded": self.decoded, "bad": self.bad,
            "bad_rate": self.bad_rate,
        }

    def to_dict(self) -> dict:
        rows = []
        for s in self.shards:
            row = asdict(s)
            row.update(count=s.count, bad_rate=s.bad_rate)
            rows.append(row)
        return {"spec": self.spec, "world": self.world, "workers": self.workers, "batch_size": self.batch_size,
                "totals": self.totals(), "shards": rows, "problems": self.problems, "warnings": self.warnings}

    def format(self, max_rows: int = 50) -> str:
        """A table of the shards (bad ones first when there are many), totals, warnings, problems."""
        lines = [f"{'shard':48s} {'status':11s} {'samples':>8s} {'source':>16s} {'decoded':>7s} {'bad':>4s} "
                 f"{'caption':>7s} {'label':>5s}"]
        rows = sorted(self.shards, key=lambda s: s.status == "ok") if len(self.shards) > max_rows else self.shards
        for s in rows[:max_rows]:
            name = s.path if len(s.path) <= 48 else "..." + s.path[-45:]
            lines.append(f"{name:48s} {s.status:11s} {s.count:8d} {s.count_source:>16s} {s.decoded:7d} {s.bad:4d} "
                         f"{s.with_caption:7d} {s.with_label:5d}")
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more shards (all ok); --json lists every shard")
        t = self.totals()
        lines.append("")
        unreachable = f", {t['unreachable']} unreachable" if t["unreachable"] else ""
        lines.append(f"shards: {t['shards']} ({t['ok']} ok, {t['missing']} missing, {t['corrupt']} corrupt"
                     f"{unreachable})")
        lines.append(f"samples: {t['samples']:,d} in the usable shards")
        per_rank = f"samples per rank: {t['samples_per_rank']:,d} (world {self.world}"
        if self.batch_size:
            dropped = self.samples - t["steps_per_epoch"] * self.batch_size * self.world
            per_rank += (f", batch {self.batch_size} per rank); steps per epoch: {t['steps_per_epoch']:,d} "
                         f"({dropped} samples of the last partial global batch dropped)")
        else:
            per_rank += "); give --batch-size for steps per epoch"
        lines.append(per_rank)
        lines.append(f"decoded: {t['decoded']} samples, {t['bad']} bad ({100 * t['bad_rate']:.1f}%)")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("OK" if not self.problems else f"{len(self.problems)} problem(s): fix them before training")
        return "\n".join(lines)


def check_shards(spec: str, *, world: int = 1, workers: int = 1, batch_size: int | None = None,
                 decode_per_shard: int = 4, image_exts=IMAGE_EXTS, caption_ext: str = "txt",
                 label_ext: str = "cls", io: RemoteIO | None = None) -> CheckReport:
    """Check every shard of `spec`; never raises for a bad shard (it becomes a problem line).
    `io`: timeout and retries of remote reads (a silent server makes its shards unreachable)."""
    if world < 1 or workers < 0 or (batch_size is not None and batch_size < 1) or decode_per_shard < 0:
        raise DataError(f"--world ({world}) and --batch-size ({batch_size}) must be >= 1, --workers ({workers}) "
                        f"and --decode ({decode_per_shard}) >= 0")
    urls = [url for part in source_parts(spec)
            for url in (read_dataset_index(part, io).urls if is_dataset_index(part) else expand_spec(part))]
    stats_cache: dict[str, dict | None] = {}
    rows = [_check_one(url, decode_per_shard, tuple(image_exts), caption_ext, label_ext, stats_cache, io)
            for url in urls]
    report = CheckReport(spec, world, workers, batch_size, rows)
    for s in rows:
        if s.status == "missing":
            report.problems.append(f"{s.path}: missing ({s.error}); fix the spec's brace range or copy the shard "
                                   "there")
        elif s.status == "corrupt":
            advice = "" if "rebuild" in s.error else "; rebuild it (`lvmtrain data build`, img2dataset) or drop it"
            report.problems.append(f"{s.path}: corrupt: {s.error}{advice}")
            continue
        elif s.status == "unreachable":
            report.problems.append(f"{s.path}: {s.error}")  # says what to do
            continue
        if s.status != "ok":
            continue
        if s.stats_samples is not None and s.stats_samples != s.samples:
            report.warnings.append(f"{s.path}: {s.count_source} says {s.stats_samples} samples, the tar holds "
                                   f"{s.samples}; the stats file is stale or the shard was rewritten")
        if s.bad:
            report.warnings.append(f"{s.path}: {s.bad} of {s.decoded} decoded samples are bad (first: "
                                   f"{s.first_bad}); the loader skips them, but check the source data")
    ok = [s for s in rows if s.status == "ok"]
    for what, attr in (("caption", "with_caption"), ("label", "with_label")):
        have = sum(getattr(s, attr) for s in ok)
        decoded = sum(s.decoded for s in ok)
        if 0 < have < decoded:
            ext = caption_ext if what == "caption" else label_ext
            report.warnings.append(f"{decoded - have} of {decoded} decoded samples have no .{ext} {what}; "
                                   f"training that needs the {what} will fail on them")
    if workers and len(urls) < world * workers:
        per = max(1, -(-report.samples // (world * workers)))
        report.warnings.append(
            f"{len(urls)} shards < world x workers = {world} x {workers} = {world * workers}: streaming readers "
            f"(webdataset split_by_node / split_by_worker) would leave workers without a shard (the indexed "
            f"loader is not affected); for streaming, reshard with `lvmtrain data build '{spec}' OUT "
            f"--per-shard {per}`")
    if report.samples and batch_size and report.steps_per_epoch == 0:
        report.warnings.append(f"{report.samples} samples are fewer than one global batch ({batch_size} x "
                               f"{world}): an epoch has no step")
    return report


def _check_one(url: str, decode_per_shard: int, image_exts: tuple, caption_ext: str, label_ext: str,
               stats_cache: dict, io: RemoteIO | None) -> ShardReport:
    path = local_path(url)
    if path is not None and not os.path.exists(path):
        return ShardReport(url, "missing", error="no such file")
    row = ShardReport(url, "ok", bytes=os.path.getsize(path) if path is not None else 0)
    samples, problem = scan_shard(url, io)
    row.samples = len(samples)
    if problem:  # unreadable, or truncated (`samples` then counts those before the cut)
        row.error = problem[1].removeprefix(f"{url}: ")
        row.status = ("unreachable" if row.error.startswith("unreachable: ") else
                      "missing" if "not found" in problem[1] else "corrupt")
        return row
    if not samples:
        row.status, row.error = "corrupt", "a tar with no samples in it"
        return row
    row.stats_samples, row.count_source = stats_count(url, stats_cache, io)
    _decode_first(url, samples[:decode_per_shard], row, image_exts, caption_ext, label_ext, io)
    return row


def _decode_first(url: str, samples: list[Sample], row: ShardReport, image_exts: tuple, caption_ext: str,
                  label_ext: str, io: RemoteIO | None) -> None:
    reader = ShardReader(max_open=1, io=io)
    fields = Fields(list(image_exts), caption_ext, label_ext, optional=True)
    try:
        for sample in samples:
            row.decoded += 1
            row.with_caption += caption_ext in sample.files
            row.with_label += label_ext in sample.files
            try:
                read_sample(sample, url, lambda offset, size: reader.read(url, offset, size), fields, decode_rgb)
            except BadSample as e:
                row.bad += 1
                row.first_bad = row.first_bad or f"{sample.key}: {e.reason}"
    except RemoteReadError as e:  # indexed, then the server stopped answering
        row.status, row.error = "unreachable", str(e).removeprefix(f"{url}: ")
    finally:
        reader.close()
