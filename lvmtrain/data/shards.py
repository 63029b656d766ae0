"""Shard listing, the per-shard sample index (tar headers or sidecars) and byte-range reads.

The epoch order over these samples' global indices is `order.py`'s; remote reads go through
`remote.py` (timeouts, retries).
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
from webdataset.tariterators import base_plus_ext

# NOTE: DataError and RemoteIO are re-exported: every reader of shards uses them
from lvmtrain.data.remote import DataError, RemoteFile, RemoteIO, RemoteReadError, unreachable  # noqa: F401


def expand_spec(spec: str) -> list[str]:
    """`/d/{000..009}.tar::/e/a.tar` -> the list of shard paths, in order."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise DataError(f"shard spec '{spec}' names no shards")
    return urls


@dataclass
class Sample:
    """Where one sample's files lie inside its shard: extension -> (byte offset, size)."""

    key: str
    files: dict[str, tuple[int, int]]


def index_shard(path: str, io: RemoteIO | None = None) -> list[Sample]:
    """Scan a tar's headers (not its contents) and group members into samples by key; raises
    `DataError` naming the shard when it is missing, unreadable or truncated."""
    samples, problem = scan_shard(path, io)
    if problem:
        raise DataError(problem[1])
    return samples


def scan_shard(path: str, io: RemoteIO | None = None) -> tuple[list[Sample], tuple[str, str] | None]:
    """(samples, problem): the samples of a tar, grouped by key, and (kind, message) when the
    shard is missing or unreadable (no samples) or truncated (the samples before the cut). A
    remote shard whose server does not answer (`io`: timeout and retries) is unreadable.

    Grouping by key rather than by adjacency also reads shards whose members are not in key
    order (img2dataset writes samples as downloads finish).
    """
    try:
        sidecar = _fresh_sidecar(path, io)
        if sidecar is not None:
            return sidecar, None
        source = open_shard(path, io)
    except RemoteReadError as e:
        return [], ("unreadable_shard", str(e))
    except FileNotFoundError:
        return [], ("unreadable_shard", f"{path}: shard not found; check the shard spec")
    except OSError as e:
        return [], ("unreadable_shard", f"{path}: cannot open ({e}); check the URL and credentials")
    samples: dict[str, Sample] = {}
    problem = None
    try:
        for name, offset, size in _tar_members(source):
            prefix, ext = base_plus_ext(name)
            if prefix is None or name.rpartition("/")[2].startswith("_"):
                continue
            samples.setdefault(prefix, Sample(prefix, {})).files[ext.lower()] = (offset, size)
    except RemoteReadError as e:  # the server stopped answering: the rest of the tar is unknown, not cut
        return [], ("unreadable_shard", str(e))
    except _Truncated as e:
        if not samples:
            return [], ("unreadable_shard", f"{path}: empty, or cut before its first sample; rebuild or remove it")
        problem = ("truncated_shard", f"{path}: truncated at byte {e}; {len(samples)} samples before "
                                      "the cut are used; rebuild this shard")
    except (tarfile.TarError, OSError, ValueError) as e:
        return [], ("unreadable_shard", f"{path}: not a readable tar file ({e}); rebuild or remove this shard")
    finally:
        try:
            source.close()
        except OSError:  # a pipe: command that failed reports it again on close
            pass
    return list(samples.values()), problem


def _fresh_sidecar(url: str, io: RemoteIO | None = None) -> list[Sample] | None:
    """The samples of a shard's index sidecar (written by `lvmtrain data build`), when there is
    one no older than the shard: it spares a scan, which for a remote shard is a full download.

    Raises RemoteReadError when the server does not answer for the sidecar: the shard itself,
    on the same server, would cost as many timeouts again.
    """
    path = local_path(url)
    try:
        if path is not None:
            side = index_path(path)
            if not side.is_file() or side.stat().st_mtime < os.stat(path).st_mtime:
                return None
            return load_index(side)
        if url.startswith("pipe:"):
            return None
        return load_index(url + INDEX_SUFFIX, io)
    except RemoteReadError as e:
        raise unreachable(url, f"its index sidecar {INDEX_SUFFIX}: {e.detail}") from None
    except (DataError, OSError):
        return None


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL (plain path or file:), else None."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if "://" in url or url.startswith("pipe:") else url


def open_shard(url: str, io: RemoteIO | None = None):
    """A binary file object for a shard: local files and fsspec URLs (s3://, gs://, http(s)://, ...)
    are seekable (one range request per read); `pipe:CMD` is a stream (webdataset's gopen).

    Every network operation of an fsspec URL ends within `io.timeout_s` and is retried
    `io.retries` times, then raises RemoteReadError naming the URL (see `RemoteFile`); a file the
    server says does not exist raises FileNotFoundError at once.
    """
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return RemoteFile(url, io or RemoteIO())




INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"


def index_path(shard: str | Path) -> Path:
    """The index sidecar of a shard: `NAME.tar` -> `NAME.tar.idx.json`."""
    return Path(str(shard) + INDEX_SUFFIX)


def write_index(path: str | Path, samples: list[Sample]) -> None:
    """Write a shard's index (`{"version": 1, "samples": [[key, {ext: [offset, size]}], ...]}`) atomically.

    Offsets are those of the member data, as `index_shard` computes them.
    """
    path = Path(path)
    doc = {"version": INDEX_VERSION,
           "samples": [[s.key, {ext: [int(o), int(n)] for ext, (o, n) in s.files.items()}] for s in samples]}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def load_index(path: str | Path, io: RemoteIO | None = None) -> list[Sample]:
    """Read an index sidecar written by `write_index` back into `Sample`s, in the order written.
    `path` may be a URL (anything `open_shard` opens)."""
    try:
        with open_shard(str(path), io) as f:
            doc = json.loads(f.read())
    except RemoteReadError:
        raise  # says what to do about the server; "rebuild the shards" would not help
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the shard index ({e}); delete it, or rebuild the shards with "
                        "`lvmtrain data build`") from None
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION or not isinstance(doc.get("samples"), list):
        raise DataError(f"{path}: not a version {INDEX_VERSION} shard index; delete it, or rebuild the shards "
                        "with `lvmtrain data build`")
    return [Sample(key, {ext: (int(o), int(n)) for ext, (o, n) in files.items()}) for key, files in doc["samples"]]


class _Truncated(Exception):
    pass


class ShardReader:
    """Reads byte ranges of shards by URL, keeping a few open (one reader per process).

    Local files and fsspec URLs seek (one range request per read, so a block of consecutive
    samples costs one round trip with fsspec's read-ahead). A `pipe:` stream cannot seek: it is
    read forward, and reopened when a read lies behind it; prefer a seekable URL for remote data.
    """

    def __init__(self, max_open: int = 8, io: RemoteIO | None = None):
        self.max_open, self.io = max_open, io
        self.files: OrderedDict[str, list] = OrderedDict()  # url -> [file, stream position or None]

    def read(self, url: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; OSError when the shard ends first."""
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
        while self.files:
            self.files.popitem()[1][0].close()


class _Bytes:
    """Sequential reads over a tar: a memory map for local files (fast), or any file object."""

    def __init__(self, f):
        self.f, self.pos, self.view = f, 0, None
        self.size = getattr(f, "size", None)  # fsspec files know their size
        name = getattr(f, "name", None)
        if isinstance(name, str) and name and local_path(name) is not None:
            self.size = os.fstat(f.fileno()).st_size
            self.view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def read(self, n: int) -> bytes:
        out = self.view[self.pos:self.pos + n] if self.view is not None else self.f.read(n)
        self.pos += len(out)
        return out

    def skip(self, n: int) -> bool:
        """Skip n bytes; False when the data ends first."""
        if self.size is not None:
            if self.pos + n > self.size:
                return False
            if self.view is None:
                self.f.seek(self.pos + n)
        else:
            left = n
            while left > 0:
                chunk = self.f.read(min(left, 1 << 20))
                if not chunk:
                    return False
                left -= len(chunk)
        self.pos += n
        return True


def _tar_members(f):
    """Yield (name, data offset, size) of a tar's regular files from their 512-byte headers.

    NOTE: 20x faster than iterating `tarfile.TarFile`, which builds a TarInfo per member; long
    names (GNU 'L', pax 'x' path=) are handled, other extensions are skipped. Works on streams
    (pipe:, no seeking) as well as files.
    """
    data = _Bytes(f)
    long_name = None
    while True:
        pos = data.pos
        header = data.read(512)
        if len(header) < 512:
            # NOTE: a complete tar ends with zero blocks; running out of bytes first means it was
            # cut (a copy or download that died).
            raise _Truncated(pos)
        if header.count(0) == 512:
            break
        if header[257:262] != b"ustar" and tarfile.calc_chksums(header)[0] != _octal(header[148:156]):
            raise tarfile.ReadError(f"not a tar header at byte {pos}")
        size = _octal(header[124:136])
        kind = header[156:157]
        body = pos + 512
        padded = (size + 511) // 512 * 512
        if kind in (b"L", b"x"):
            payload = data.read(padded)
            if len(payload) < padded:
                raise _Truncated(pos)
            if kind == b"L":
                long_name = payload[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                for rec in payload[:size].decode("utf-8", "surrogateescape").split("\n"):
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
            continue
        if not data.skip(padded):
            raise _Truncated(pos)
        if kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[0:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
                prefix = header[345:500].rstrip(b"\0")
                if header[257:262] == b"ustar" and prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            yield name, body, size
        long_name = None


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


class ShardSet:
    """The samples of a list of shards, addressable by a global index 0..N-1.

    A shard that is missing or unreadable contributes no samples, a truncated one the samples
    before the cut; each is listed in `problems` as (url, kind, message) for the trainer to report
    and count. Only when no shard has a sample is it an error.
    """

    def __init__(self, urls: list[str], source_of_shard: list[int] | None = None, io: RemoteIO | None = None):
        self.urls = urls
        self.source_of_shard = source_of_shard or [0] * len(urls)
        self.io = io
        self.samples, self.problems = [], []
        for url in urls:
            samples, problem = scan_shard(url, io)
            self.samples.append(samples)
            if problem:
                self.problems.append((url, *problem))
        counts = np.array([len(s) for s in self.samples], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        if self.offsets[-1] == 0:
            detail = self.problems[0][2] if self.problems else f"{urls[0]} holds no samples"
            raise DataError(f"no usable samples in {len(urls)} shard(s): {detail}")

    @classmethod
    def from_spec(cls, spec: str, io: RemoteIO | None = None) -> ShardSet:
        """Shards of a spec; each `::`-separated part is a source (for `data.train_weights`).
        `io`: timeout and retries of remote reads (`RemoteIO.from_config(cfg.data)`)."""
        urls, sources = [], []
        for i, part in enumerate(p for p in spec.split("::") if p.strip()):
            part_urls = expand_spec(part)
            urls += part_urls
            sources += [i] * len(part_urls)
        return cls(urls, sources, io)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of global sample indices per source, in spec order."""
        ranges = []
        for source in range(max(self.source_of_shard) + 1):
            shards = [i for i, s in enumerate(self.source_of_shard) if s == source]
            ranges.append((int(self.offsets[shards[0]]), int(self.offsets[shards[-1] + 1])))
        return ranges

    def locate(self, index: int) -> tuple[int, Sample]:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, self.samples[shard][index - self.offsets[shard]]
