"""One shard's sample index: the tar's 512-byte headers scanned (not its contents), or its index
sidecar `NAME.tar.idx.json` (written by `lvmtrain data build` / `lvmtrain data index`), grouped
into samples by key; `ShardTable` holds one shard's index compactly for the worker that reads it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from lvmtrain.data.remote import DataError, RemoteIO, RemoteReadError, unreachable
from lvmtrain.data.spec import local_path, open_shard


@dataclass
class Sample:
    """Where one sample's files lie inside its shard: extension -> (byte offset, size)."""

    key: str
    files: dict[str, tuple[int, int]]


class ShardTable:
    """One shard's samples, compactly (~100 bytes a sample instead of a `Sample`'s ~900): the keys,
    and per extension an array of (offset, size) rows, (-1, 0) where a sample has no such file;
    `problem`: (kind, message) when the shard could not be read whole (`scan_shard`)."""

    __slots__ = ("keys", "files", "problem")

    def __init__(self, keys: list[str], files: list[dict], problem: tuple[str, str] | None = None):
        """`files[i]`: {extension: (offset, size)} of sample `keys[i]`."""
        self.problem = problem
        self.keys = keys
        self.files: dict[str, np.ndarray] = {}
        for ext in sorted({ext for f in files for ext in f}):
            self.files[ext] = np.array([f.get(ext, (-1, 0)) for f in files], dtype=np.int64).reshape(-1, 2)

    @classmethod
    def of(cls, samples: list[Sample], problem: tuple[str, str] | None = None) -> ShardTable:
        return cls([s.key for s in samples], [s.files for s in samples], problem)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Sample(self.keys[i], {ext: (int(a[i, 0]), int(a[i, 1])) for ext, a in self.files.items()
                                     if a[i, 0] >= 0})

    def span(self, positions) -> tuple[int, int, int]:
        """(first byte, end, bytes of member data) of the samples at `positions`: one range read
        of [first, end) holds all their files."""
        rows = np.concatenate([a[positions] for a in self.files.values()])
        rows = rows[rows[:, 0] >= 0]
        return int(rows[:, 0].min()), int((rows[:, 0] + rows[:, 1]).max()), int(rows[:, 1].sum())

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.files.values()) + sum(49 + len(k) + 8 for k in self.keys)


def index_shard(path: str, io: RemoteIO | None = None) -> list[Sample]:
    """Scan a tar's headers (not its contents) and group members into samples by key; raises
    `DataError` naming the shard when it is missing, unreadable or truncated."""
    samples, problem = scan_shard(path, io)
    if problem:
        raise DataError(problem[1])
    return list(samples)


def scan_shard(path: str, io: RemoteIO | None = None, sidecar: str | None = None
               ) -> tuple[list[Sample] | ShardTable, tuple[str, str] | None]:
    """(samples, problem): the samples of a tar, grouped by key, and (kind, message) when the
    shard is missing or unreadable (no samples) or truncated (the samples before the cut). A
    remote shard whose server does not answer (`io`: timeout and retries) is unreadable.
    `sidecar`: where the shard's index sidecar lives when not beside it (a dataset index says).

    Grouping by key rather than by adjacency also reads shards whose members are not in key
    order (img2dataset writes samples as downloads finish).
    """
    try:
        indexed = _fresh_sidecar(path, io, sidecar)
        if indexed is not None:
            return indexed, None
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


def _fresh_sidecar(url: str, io: RemoteIO | None = None, sidecar: str | None = None) -> ShardTable | None:
    """The samples of a shard's index sidecar (beside it: `url` + INDEX_SUFFIX, or at `sidecar`),
    when there is one no older than the shard (compared when both are local): it spares a scan,
    which for a remote shard is a full download.

    Raises RemoteReadError when the server does not answer for the sidecar: the shard itself,
    on the same server, would cost as many timeouts again.
    """
    path = local_path(url)
    side = sidecar or (None if url.startswith("pipe:") else url + INDEX_SUFFIX)
    try:
        if side is None:
            return None
        if local_path(side) is not None:
            side = Path(local_path(side))
            if not side.is_file() or (path is not None and side.stat().st_mtime < os.stat(path).st_mtime):
                return None
        return load_index(side, io)
    except RemoteReadError as e:
        raise unreachable(url, f"its index sidecar {INDEX_SUFFIX}: {e.detail}") from None
    except (DataError, OSError):
        return None


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


def load_index(path: str | Path, io: RemoteIO | None = None) -> ShardTable:
    """Read an index sidecar written by `write_index` back (its `Sample`s, in the order written:
    `list(load_index(p))`). `path` may be a URL (anything `open_shard` opens).

    NOTE: ~3 ms per 1,000 samples, parsed with the cyclic GC paused: its collections, triggered by
    the parse's many small objects, scan the whole heap (torch's included) and cost 7x more.
    """
    try:
        with open_shard(str(path), io) as f, _gc_paused():
            doc = json.loads(f.read())
    except RemoteReadError:
        raise  # says what to do about the server; "rebuild the shards" would not help
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the shard index ({e}); delete it, or rebuild the shards with "
                        "`lvmtrain data build`") from None
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION or not isinstance(doc.get("samples"), list):
        raise DataError(f"{path}: not a version {INDEX_VERSION} shard index; delete it, or rebuild the shards "
                        "with `lvmtrain data build`")
    with _gc_paused():
        return ShardTable([key for key, _ in doc["samples"]], [files for _, files in doc["samples"]])


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Truncated(Exception):
    pass


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
