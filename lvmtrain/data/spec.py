"""Shard specs and URLs: brace expansion, sources, local paths, and opening a shard (local file,
fsspec URL through `remote.py`'s timeouts and retries, or a `pipe:` stream)."""

from __future__ import annotations

import braceexpand

from lvmtrain.data.remote import DataError, RemoteFile, RemoteIO


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


def source_parts(spec: str) -> list[str]:
    """The `::`-separated sources of a spec (for `data.train_weights`), stripped, in order."""
    parts = [part.strip() for part in spec.split("::") if part.strip()]
    if not parts:
        raise DataError(f"shard spec '{spec}' names no shards")
    return parts


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
