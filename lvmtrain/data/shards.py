"""The shards of a run, as every process holds them: URLs and per-shard sample counts, O(shards)
(~20 bytes a shard), counted once by rank 0 (`dataset_index.py`) and broadcast. A shard's
member offsets (`ShardTable`) are loaded only by the process that reads it, on first use, and
kept in a small LRU; `ShardReader` reads blocks of consecutive samples with one range request.

Spec parsing is `spec.py`'s, one shard's tar index `tarindex.py`'s, the epoch order `order.py`'s.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from lvmtrain.data.dataset_index import Counted, count_source
# NOTE: re-exported: every reader of shards uses these
from lvmtrain.data.remote import DataError, RemoteIO, RemoteReadError  # noqa: F401
from lvmtrain.data.spec import expand_spec, local_path, open_shard, source_parts  # noqa: F401
from lvmtrain.data.tarindex import INDEX_SUFFIX, Sample, ShardTable, index_shard, scan_shard  # noqa: F401

TABLES_KEPT = 16
"""Shard tables a process keeps (LRU): ~1 MB each for 10k samples."""


SHORT_WARNINGS = 20
_short_warned = [0]


def _warn_short(url: str, problem: tuple[str, str] | None, held: int, count: int) -> None:
    _short_warned[0] += 1
    if _short_warned[0] > SHORT_WARNINGS:
        return
    if problem is not None and problem[0] == "unreadable_shard":
        print(f"lvmtrain: warning: {problem[1]}; its {count} samples are skipped as unreadable_sample",
              file=sys.stderr, flush=True)
    else:
        why = problem[1] if problem else f"{url}: holds {held} samples"
        print(f"lvmtrain: warning: {why}; its count says {count}: the samples past its end are skipped as "
              "missing_sample; rerun `lvmtrain data index` (or `data check`) on this data", file=sys.stderr, flush=True)
    if _short_warned[0] == SHORT_WARNINGS:
        print("lvmtrain: further short or unreadable shards are counted in metrics.jsonl, not printed", file=sys.stderr)


class UrlList(Sequence):
    """Shard URLs in about len(name) + 8 bytes each: their common prefix once, the rest in one blob."""

    def __init__(self, urls: list[str]):
        self.prefix = os.path.commonprefix(urls) if urls else ""
        names = [url[len(self.prefix):].encode("utf-8", "surrogateescape") for url in urls]
        self.ends = np.cumsum([len(n) for n in names], dtype=np.int64)
        self.blob = b"".join(names)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        lo = int(self.ends[i - 1]) if i else 0
        return self.prefix + self.blob[lo:int(self.ends[i])].decode("utf-8", "surrogateescape")

    def nbytes(self) -> int:
        return self.ends.nbytes + len(self.blob) + len(self.prefix)


class ShardReader:
    """Reads byte ranges of shards by URL, keeping a few open (one reader per process).

    Local files and fsspec URLs seek (one range request per read, so a block of consecutive
    samples costs one round trip with fsspec's read-ahead). A `pipe:` stream cannot seek: it is
    read forward, and reopened when a read lies behind it; prefer a seekable URL for remote data.
    """

    def __init__(self, max_open: int = 8, io: RemoteIO | None = None):
        self.max_open, self.io = max_open, io
        self.files: OrderedDict[str, list] = OrderedDict()  # url -> [file, stream position or None]
        self.held: dict[str, list[tuple[int, bytes]]] = {}  # url -> [(first byte, data)]

    def hold(self, url: str, start: int, end: int) -> None:
        """Read [start, end) of a shard in one request and serve the reads inside it from memory,
        until `release()`: a block of consecutive samples costs one round trip."""
        self.held.setdefault(url, []).append((start, self._read(url, start, end - start)))

    def release(self) -> None:
        self.held.clear()

    def read(self, url: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; OSError when the shard ends first."""
        for start, data in self.held.get(url, ()):
            if start <= offset and offset + size <= start + len(data):
                return data[offset - start:offset - start + size]
        return self._read(url, offset, size)

    def _read(self, url: str, offset: int, size: int) -> bytes:
        entry = self.files.pop(url, None)
        if entry is not None and entry[1] is not None and entry[1] > offset:
            entry[0].close()  # a stream already past this range
            entry = None
        if entry is None:
            f = open_shard(url, self.io)
            entry = [f, None if getattr(f, "seekable", lambda: False)() else 0]
            if len(self.files) >= self.max_open:
                self.files.popitem(last=False)[1][0].close()
        self.files[url] = entry
        f, pos = entry
        if pos is None:
            f.seek(offset)
        else:
            while pos < offset:
                chunk = f.read(min(offset - pos, 1 << 20))
                if not chunk:
                    raise OSError(f"{url}: shard ended before byte {offset}")
                pos += len(chunk)
        data = f.read(size)
        if pos is not None:
            entry[1] = offset + len(data)
        if len(data) != size:
            raise OSError(f"{url}: shard ended {size - len(data)} bytes early")
        return data

    def close(self) -> None:
        self.held.clear()
        while self.files:
            self.files.popitem()[1][0].close()


class ShardSet:
    """The samples of a list of shards, addressable by a global index 0..N-1.

    Holds per shard only its URL and sample count (`offsets`, their prefix sums); the samples of a
    shard are looked up in its `table`, loaded on first use. A shard that is missing or
    unreadable contributes no samples, a truncated one the samples before the cut; each is listed
    in `problems` as (url, kind, message) for the trainer to report and count. Only when no shard
    has a sample is it an error.
    """

    def __init__(self, sources: list[Counted], io: RemoteIO | None = None):
        self.urls = UrlList([url for s in sources for url in s.urls])
        self.offsets = np.concatenate([[0], np.cumsum([n for s in sources for n in s.counts], dtype=np.int64)])
        self.source_ends = np.cumsum([len(s.urls) for s in sources])
        self.sidecars = [s.sidecars for s in sources]
        self.problems = [p for s in sources for p in s.problems]
        self.io = io
        self._tables: OrderedDict[int, ShardTable] = OrderedDict()
        if self.offsets[-1] == 0:
            detail = self.problems[0][2] if self.problems else f"{self.urls[0]} holds no samples"
            raise DataError(f"no usable samples in {len(self.urls)} shard(s): {detail}")

    @classmethod
    def from_spec(cls, spec: str, io: RemoteIO | None = None) -> ShardSet:
        """Shards of a spec; each `::`-separated part is a source (for `data.train_weights`): a brace
        spec of shards, or a dataset index file (`*.json`, `lvmtrain data index`). `io`: timeout and
        retries of remote reads (`RemoteIO.from_config(cfg.data)`). Call it on one process and
        share the result (`dims.from_rank0`): it reads every shard's count."""
        return cls([count_source(part, io) for part in source_parts(spec)], io)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": OrderedDict()}  # NOTE: what one process loaded stays there

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def count(self, shard: int) -> int:
        return int(self.offsets[shard + 1] - self.offsets[shard])

    def state_bytes(self) -> int:
        """Bytes of the global state every process holds."""
        return self.urls.nbytes() + self.offsets.nbytes + self.source_ends.nbytes

    def source_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of global sample indices per source, in spec order."""
        starts = np.concatenate([[0], self.source_ends[:-1]])
        return [(int(self.offsets[a]), int(self.offsets[b])) for a, b in zip(starts, self.source_ends)]

    def locate(self, index) -> tuple[int, int]:
        """(shard, position in the shard) of global sample `index`."""
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, int(index - self.offsets[shard])

    def sidecar_url(self, shard: int) -> str | None:
        """Where the dataset index says the shard's sidecar lives, when not beside the shard."""
        mapping = self.sidecars[int(np.searchsorted(self.source_ends, shard, side="right"))]
        if mapping is None:
            return None
        url = self.urls[shard]
        return mapping[1] + url[len(mapping[0]):] + INDEX_SUFFIX

    def table(self, shard: int) -> ShardTable:
        """The samples of one shard (its sidecar, or a scan), kept among the last TABLES_KEPT used.

        When the shard does not hold the samples its count promised (unreadable now, or a stale
        index or stats file, a shard cut since), the positions past its end are unusable samples for
        the caller to count; that is said here, for the first SHORT_WARNINGS such shards of a process.
        """
        table = self._tables.pop(shard, None)
        if table is None:
            url = self.urls[shard]
            samples, problem = scan_shard(url, self.io, self.sidecar_url(shard))
            table = samples if isinstance(samples, ShardTable) else ShardTable.of(samples)
            table.problem = problem
            if len(table) != self.count(shard):
                _warn_short(url, problem, len(table), self.count(shard))
            if len(self._tables) >= TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables[shard] = table
        return table

    def tables(self) -> list[ShardTable]:
        """Every shard's table (a small data set's, or a test's: it loads each shard)."""
        return [self.table(i) for i in range(len(self.urls))]

    def sample(self, index) -> tuple[str, Sample | None, tuple[str, str] | None]:
        """(shard URL, sample, problem) of global index `index`; the sample is None when the shard
        does not hold it (now): `problem` then says why when the shard could not be read whole."""
        shard, position = self.locate(index)
        table = self.table(shard)
        return self.urls[shard], table[position] if position < len(table) else None, table.problem
