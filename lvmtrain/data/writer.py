"""The one shard writer: a WebDataset tar in img2dataset's layout, written atomically, with its
index sidecar (so a run never scans it). `data build`, `data demo`, tests and benchmarks use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from lvmtrain.data.tarindex import Sample, index_path, write_index


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes | str]]], *,
                sidecar: bool = True) -> list[Sample]:
    """Write `(key, {extension: bytes or str})` samples to the tar `path`, then its index sidecar
    `path.idx.json`; returns where each sample's files landed.

    The tar is written to `path.partial` and renamed only once complete, so a crash or a full
    disk never leaves a truncated shard under the real name; the sidecar is written after the tar,
    so it is never older than it (an older one is ignored as stale). `sidecar=False` only for
    tests that need a shard without one.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    written = []
    try:
        with wds.TarWriter(str(partial), encoder=False, mtime=0) as sink:
            for key, files in samples:
                data = {ext: value.encode("utf-8") if isinstance(value, str) else value for ext, value in files.items()}
                written.append(_write_sample(sink, key, data))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if sidecar:
        write_index(index_path(path), written)
    return written


def _write_sample(sink: wds.TarWriter, key: str, files: dict[str, bytes]) -> Sample:
    """`sink.write` plus where each member's data lands.

    NOTE: TarWriter writes a sample's members in sorted extension order, each a 512-byte USTAR
    header and its data padded to 512 bytes; the position is checked against the tar's own offset.
    """
    pos = sink.tarstream.offset
    where = {}
    for ext in sorted(files):
        where[ext] = (pos + 512, len(files[ext]))
        pos += 512 + (len(files[ext]) + 511) // 512 * 512
    sink.write({"__key__": key, **files})
    if pos != sink.tarstream.offset:
        raise RuntimeError(f"{key}: tar layout is not one 512-byte header per member; cannot index it")
    return Sample(key, where)
