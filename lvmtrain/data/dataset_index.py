"""Per-shard sample counts: the dataset index (`lvmtrain data index`), img2dataset's stats files,
the shards' own sidecars, or a scan. Rank 0 gets them once (`ShardSet.from_spec`); nobody scans
590k shards at start-up once a dataset index exists.

The dataset index is one JSON file:
    {"format": "lvmtrain-dataset-index", "version": 1, "base": PREFIX, "sidecars": PREFIX,
     "shards": [[NAME, COUNT], ...], "problems": [[NAME, KIND, MESSAGE], ...], "samples": TOTAL}
Shard i is `base + NAME`, its index sidecar `sidecars + NAME + ".idx.json"`; a relative `base` or
`sidecars` is relative to the index file's folder ("" is that folder). A shard that could not be
read when indexing has count 0 and a problem row.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lvmtrain.data.remote import DataError, RemoteIO, RemoteReadError
from lvmtrain.data.spec import expand_spec, local_path, open_shard
from lvmtrain.data.tarindex import INDEX_SUFFIX, _fresh_sidecar, index_path, scan_shard, write_index

FORMAT, VERSION = "lvmtrain-dataset-index", 1
DEFAULT_NAME = "lvmtrain-index.json"


@dataclass
class Counted:
    """The shards of one source with their sample counts; `sidecars`: (shard prefix, sidecar
    prefix) when the sidecars do not lie beside the shards."""

    urls: list[str]
    counts: list[int]
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    sidecars: tuple[str, str] | None = None


def is_dataset_index(part: str) -> bool:
    """A source of a spec that names a dataset index rather than shards."""
    return part.endswith(".json")


def count_source(part: str, io: RemoteIO | None = None, threads: int = 16) -> Counted:
    """The counts of one `::` source of a spec: from its dataset index, else per shard (`shard_count`,
    in `threads` threads: remote reads overlap)."""
    if is_dataset_index(part):
        return read_dataset_index(part, io)
    urls = expand_spec(part)
    if len(urls) > 1000:
        print(f"lvmtrain: counting the samples of {len(urls):,} shards of '{part}' (no dataset index; "
              f"`lvmtrain data index '{part}'` writes one and spares this)", file=sys.stderr, flush=True)
    cache: dict = {}
    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        rows = list(pool.map(lambda url: shard_count(url, io, cache), urls))
    return Counted(urls, [n for n, _ in rows], [(url, *p) for url, (_, p) in zip(urls, rows) if p])


def shard_count(url: str, io: RemoteIO | None = None, cache: dict | None = None) -> tuple[int, tuple | None]:
    """(samples, problem) of one shard: its fresh sidecar, else img2dataset's / `data build`'s
    stats file, else a scan of its headers (which also finds a cut or unreadable shard)."""
    try:
        indexed = _fresh_sidecar(url, io)
    except RemoteReadError as e:
        return 0, ("unreadable_shard", str(e))
    if indexed is not None:
        return len(indexed), None
    claimed, _ = stats_count(url, {} if cache is None else cache, io)
    if claimed is not None:
        return claimed, None
    samples, problem = scan_shard(url, io)
    return len(samples), problem


def stats_count(url: str, cache: dict, io: RemoteIO | None = None) -> tuple[int | None, str]:
    """(samples, file name) claimed by `{stem}_stats.json` (img2dataset) or the folder's
    `_stats.json` (`data build`), or (None, "index") when neither says."""
    if url.startswith("pipe:"):
        return None, "index"
    folder, _, name = url.rpartition("/")
    stem = name[:-4] if name.endswith(".tar") else name.rpartition(".")[0] or name
    own = _read_json(f"{folder}/{stem}_stats.json", cache, io)
    if own is not None and isinstance(own.get("successes"), int):
        return own["successes"], f"{stem}_stats.json"
    built = _read_json(f"{folder}/_stats.json", cache, io)
    if built is not None and isinstance(built.get("shards"), dict) and isinstance(built["shards"].get(name), int):
        return built["shards"][name], "_stats.json"
    return None, "index"


def _read_json(url: str, cache: dict, io: RemoteIO | None) -> dict | None:
    if url not in cache:
        try:
            with open_shard(url, io) as f:
                value = json.loads(f.read())
            cache[url] = value if isinstance(value, dict) else None
        except (OSError, ValueError):  # absent or unreadable: counted another way
            cache[url] = None
    return cache[url]


def _resolve(prefix: str, folder: str) -> str:
    """A prefix of the index made absolute against the index's own folder (path or URL)."""
    if "://" in prefix or prefix.startswith(("/", "file:", "pipe:")):
        return prefix
    return folder + "/" + prefix if prefix else folder + "/"


def read_dataset_index(url: str, io: RemoteIO | None = None) -> Counted:
    """The shards and counts of a dataset index file (path or URL)."""
    advice = "rebuild it with `lvmtrain data index`"
    try:
        with open_shard(url, io) as f:
            doc = json.loads(f.read())
    except RemoteReadError:
        raise
    except FileNotFoundError:
        raise DataError(f"{url}: dataset index not found; check data.train / data.val, or write it with "
                        "`lvmtrain data index SPEC --out PATH`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: cannot read the dataset index ({e}); {advice}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{url}: not an lvmtrain dataset index (a '.json' source of a spec must be one); "
                        "name shards with a brace spec, or write an index with `lvmtrain data index`")
    if doc.get("version") != VERSION:
        raise DataError(f"{url}: dataset index version {doc.get('version')}, this lvmtrain reads {VERSION}; {advice}")
    try:
        folder = url.rpartition("/")[0] or "."
        base, side = _resolve(doc["base"], folder), _resolve(doc["sidecars"], folder)
        names = [str(name) for name, _ in doc["shards"]]
        counts = [int(n) for _, n in doc["shards"]]
        problems = [(base + name, str(kind), str(message)) for name, kind, message in doc.get("problems", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{url}: malformed dataset index ({type(e).__name__}: {e}); {advice}") from None
    if not names or min(counts) < 0:
        raise DataError(f"{url}: the dataset index lists no shards or a negative count; {advice}")
    return Counted([base + name for name in names], counts, problems, None if side == base else (base, side))


def _index_one(task: tuple) -> tuple[int, tuple | None]:
    """Count one shard; write its sidecar (at `sidecar`, or beside a local shard) when it has none."""
    url, sidecar, io = task
    samples = _fresh_sidecar(url, io, sidecar)
    if samples is not None:
        return len(samples), None
    samples, problem = scan_shard(url, io)
    if samples and problem is None:
        target = sidecar or (str(index_path(local_path(url))) if local_path(url) is not None else None)
        if target is not None:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            write_index(target, samples)
    return len(samples), problem


def write_dataset_index(spec: str, out: str | None = None, *, sidecars: str | None = None, workers: int = 0,
                        io: RemoteIO | None = None) -> tuple[Path, Counted]:
    """`lvmtrain data index`: count every shard of `spec` (one source) in parallel processes, write
    the index sidecar of each shard that has none (beside a local shard, or under the folder
    `sidecars`: needed for remote shards), then the dataset index at `out` (default: beside the
    shards, `lvmtrain-index.json`). Returns (index path, what it lists)."""
    if "::" in spec:
        raise DataError(f"'{spec}': one dataset index per source; index each `::` part on its own")
    urls = expand_spec(spec)
    common = os.path.commonprefix(urls)
    names = [url[common.rfind("/") + 1:] for url in urls]
    base = common[:common.rfind("/") + 1]
    local = local_path(urls[0]) is not None
    if local:  # NOTE: absolute, so the index means the same from any working directory
        base = str(Path(local_path(base) or ".").resolve()) + "/"
        urls = [base + name for name in names]
    elif out is None:
        raise DataError(f"{spec}: remote shards: say where the dataset index goes (--out PATH)")
    out_path = Path(out if out is not None else base + DEFAULT_NAME).resolve()
    if sidecars is None and not local:
        sidecars = str(out_path.parent / "sidecars")
    side_base = base if sidecars is None else str(Path(sidecars).resolve()) + "/"
    tasks = [(url, None if sidecars is None else side_base + name + INDEX_SUFFIX, io) for url, name in zip(urls, names)]
    start = time.perf_counter()
    workers = workers or min(len(urls), os.cpu_count() or 1)
    if workers > 1:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            rows = pool.map(_index_one, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
    else:
        rows = [_index_one(t) for t in tasks]
    folder = str(out_path.parent) + "/"

    def relative(prefix: str) -> str:
        return prefix[len(folder):] if local_path(prefix) == prefix and prefix.startswith(folder) else prefix

    doc = {"format": FORMAT, "version": VERSION, "base": relative(base), "sidecars": relative(side_base),
           "shards": [[name, n] for name, (n, _) in zip(names, rows)],
           "problems": [[name, *p] for name, (_, p) in zip(names, rows) if p],
           "samples": sum(n for n, _ in rows), "seconds": round(time.perf_counter() - start, 1)}
    tmp = out_path.with_name(out_path.name + ".partial")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, out_path)
    counted = Counted(urls, [n for n, _ in rows], [(url, *p) for url, (_, p) in zip(urls, rows) if p])
    return out_path, counted
