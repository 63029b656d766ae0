"""Remote shards (any fsspec URL): every network operation ends within `data.io_timeout_s` and is
retried `data.io_retries` times with a short backoff, then fails naming the URL; a host that keeps
failing is given up on for a while. Local files and `pipe:` streams do not come here.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class DataError(RuntimeError):
    """Shards that cannot be used; the message names the shard (and sample) and what to do."""

class RemoteReadError(DataError, OSError):
    """A remote read that failed every attempt (no answer in time, connection refused, server
    error). An OSError too, so every reader that survives a failed read survives this one."""

    detail = ""
    """What failed, without the URL and the advice."""



@dataclass(frozen=True)
class RemoteIO:
    """How long a remote read may take and how often it is tried (`data.io_timeout_s`,
    `data.io_retries`); local files and `pipe:` streams do not use it."""

    timeout_s: float = 60.0
    retries: int = 3

    def __post_init__(self):
        if not self.timeout_s > 0 or self.retries < 0:
            raise DataError(f"data.io_timeout_s must be > 0 and data.io_retries >= 0, got {self.timeout_s} and "
                            f"{self.retries}")

    @classmethod
    def from_config(cls, cfg) -> RemoteIO:
        """From a DataConfig."""
        return cls(float(cfg.io_timeout_s), int(cfg.io_retries))

    @property
    def attempts(self) -> int:
        return 1 + self.retries


BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Pause before retry 1, 2, ... (the last one repeats)."""
HOST_DOWN_AFTER = 3
"""Operations on one host that failed every attempt, in a row, after which its other reads fail
at once for `HOST_DOWN_S` (then it is tried again)."""
HOST_DOWN_S = 60.0
"""Seconds a host given up on is not tried."""
MAX_RETRY_WARNINGS = 20
"""Retries named on stderr per process; the rest are silent (the final error names the URL)."""
READ_AHEAD = 1 << 20
"""Bytes a small remote read fetches at least (served to the next reads)."""

# host -> (operations that failed every attempt, in a row; time.monotonic() of the last)
_failed_in_a_row: dict[str, tuple[int, float]] = {}
_retry_warnings = [0]
REMOTE_ADVICE = ("check that the server is up and reachable from here, or raise data.io_timeout_s / data.io_retries "
                 "(`lvmtrain data check --io-timeout-s`)")


def unreachable(url: str, detail: str) -> RemoteReadError:
    e = RemoteReadError(f"{url}: unreachable: {detail}; {REMOTE_ADVICE}")
    e.detail = detail
    return e


class _NoAnswer(Exception):
    """The helper thread did not finish an operation within the deadline."""


class _Runner:
    """A daemon thread that runs one operation at a time for its owner, who waits a bounded time.

    NOTE: the deadline is kept here rather than left to the filesystem: fsspec's http filesystem
    waits 5 minutes (aiohttp's default) for each of a HEAD and a GET before it calls a silent
    server's shard *not found*, and s3fs / gcsfs each have their own settings. A thread that
    overruns is abandoned (daemon: it never delays exit) and its owner starts a new one.
    """

    def __init__(self):
        self.pid = os.getpid()  # a runner inherited through fork has no thread in the child
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="lvmtrain-remote-read", daemon=True).start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides
                box.append((False, e))
            done.set()

    def call(self, fn, timeout: float):
        box: list = []
        done = threading.Event()
        self.jobs.put((fn, box, done))
        if not done.wait(timeout):
            raise _NoAnswer
        ok, value = box[0]
        if ok:
            return value
        raise value

    def stop(self) -> None:
        self.jobs.put(None)


class RemoteFile:
    """A read-only fsspec file whose every network operation (open, each read) ends within
    `io.timeout_s` and is retried up to `io.retries` times on a fresh connection, with a short
    backoff, before RemoteReadError. Retries are named on stderr as they happen, so a slow server
    is not mistaken for a hang.

    Once `HOST_DOWN_AFTER` operations on a host in a row have failed every attempt, further reads
    of that host in this process fail at once for `HOST_DOWN_S`: a dead server then costs a check
    or a start-up three rounds of timeouts, not three per shard.
    """

    def __init__(self, url: str, io: RemoteIO):
        import fsspec

        self.url, self.io, self.host = url, io, urlsplit(url).netloc or url
        kwargs = {}
        if url.startswith(("http://", "https://")):
            import aiohttp
            from fsspec.config import conf

            # NOTE: the deadline is kept by _Runner; these only let an abandoned request end (and
            # free its socket) instead of waiting on a silent server for aiohttp's 5 minutes. Merged
            # into fsspec's configured client_kwargs (headers, auth), which ours would replace.
            client = dict(conf.get(url.partition("://")[0], {}).get("client_kwargs", {}))
            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=io.timeout_s, sock_read=io.timeout_s)
            kwargs["client_kwargs"] = client
        self.fs, self.path = fsspec.core.url_to_fs(url, **kwargs)
        self.pos, self.file, self.runner = 0, None, None
        self.ahead, self.ahead_at = b"", 0  # bytes read ahead, from offset ahead_at
        try:
            self.size, self._seekable = self._call(lambda f, pos: (getattr(f, "size", None), f.seekable()), "open")
        except BaseException:
            self.close()
            raise

    def _attempt(self, f, pos: int, op):
        """On the runner thread: (the file, op(file, pos)), opening the file at `pos` when `f` is None.

        NOTE: touches no attribute of self that changes; an abandoned attempt may finish long
        after the caller gave up on it, and must not overwrite what the caller did since.
        """
        opened = f is None
        if opened:
            f = self.fs.open(self.path, "rb")
        try:
            if opened and pos and f.seekable():
                f.seek(pos)
            elif opened and pos:  # a stream (a server without range requests): read up to where we were
                left = pos
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise OSError(f"stream ended at byte {pos - left}, before byte {pos}")
                    left -= len(chunk)
            return f, op(f, pos)
        except BaseException:
            if opened:
                _close_quietly(f)
            raise

    def _call(self, op, what: str):
        """op(file, position) on the runner thread, within the deadline, retried; what: "open", "read"."""
        failed, last = _failed_in_a_row.get(self.host, (0, 0.0))
        if failed >= HOST_DOWN_AFTER and time.monotonic() - last < HOST_DOWN_S:
            raise unreachable(self.url, f"not tried: the last {failed} reads from {self.host} failed every attempt "
                                         f"(timeout {self.io.timeout_s:g} s)")
        errors: list[str] = []
        for attempt in range(self.io.attempts):
            if attempt:
                pause = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
                _warn_retry(f"{self.url}: {what}: {errors[-1]} (attempt {attempt} of {self.io.attempts}); "
                            f"retrying in {pause:g} s")
                time.sleep(pause)
            if self.runner is None or self.runner.pid != os.getpid():
                self.runner = _Runner()
            f, pos = self.file, self.pos
            try:
                self.file, result = self.runner.call(lambda: self._attempt(f, pos, op), self.io.timeout_s)
            except _NoAnswer:
                # The thread is still inside the call: leave it (it ends after its call) and the
                # file it holds behind.
                errors.append(f"no answer within {self.io.timeout_s:g} s")
                self.runner.stop()
                self.runner, self.file = None, None
                continue
            except Exception as e:  # noqa: BLE001 - sorted by _transient; the rest re-raised
                if not _transient(e):
                    _failed_in_a_row.pop(self.host, None)  # it answered (404, 403, ...): the host is up
                    raise
                errors.append(_describe(e))
                self._drop_file()
                continue
            _failed_in_a_row.pop(self.host, None)
            return result
        _failed_in_a_row[self.host] = (_failed_in_a_row.get(self.host, (0, 0.0))[0] + 1, time.monotonic())
        reasons = "; ".join(dict.fromkeys(errors))
        raise unreachable(self.url, f"{what} failed {self.io.attempts} attempt(s) ({reasons}; timeout "
                                     f"{self.io.timeout_s:g} s each)")

    def _drop_file(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            _close_quietly(f)

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        start = self.pos - self.ahead_at
        if 0 <= n and 0 <= start and start + n <= len(self.ahead):
            self.pos += n
            return self.ahead[start:start + n]
        # NOTE: small reads (a scan reads each 512-byte tar header) are served from a read-ahead:
        # a hand-off to the runner thread costs ~50 us, 3x a whole local scan. The filesystem reads
        # ahead further still (fsspec's http: 5 MB), so this adds no network traffic.
        want = max(n, READ_AHEAD) if self._seekable and n >= 0 else n

        def op(f, pos):
            if self._seekable and f.tell() != pos:
                f.seek(pos)
            return f.read(want)

        data = self._call(op, "read")
        if want != n:
            self.ahead, self.ahead_at = data, self.pos
            data = data[:n]
        self.pos += len(data)
        return data

    def close(self) -> None:
        self._drop_file()
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_quietly(f) -> None:
    try:
        f.close()
    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
        pass


def _transient(e: BaseException) -> bool:
    """Worth another attempt: no answer, a dropped or refused connection, a server error (5xx,
    408, 429). Not: a file the server says is not there, a refused credential, a bug."""
    seen = e
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int):  # aiohttp.ClientResponseError and its kin
            return status >= 500 or status in (408, 429)
        if isinstance(seen, (TimeoutError, ConnectionError)) or type(seen).__module__.startswith("aiohttp"):
            return True
        seen = seen.__cause__ or seen.__context__
    # NOTE: fsspec's http filesystem reports *any* failure of its HEAD and GET as FileNotFoundError;
    # only the cause (walked above) tells a silent server from a missing file.
    return isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))


def _describe(e: BaseException) -> str:
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def _warn_retry(message: str) -> None:
    _retry_warnings[0] += 1
    if _retry_warnings[0] <= MAX_RETRY_WARNINGS:
        print(f"lvmtrain: warning: {message}", file=sys.stderr, flush=True)
        if _retry_warnings[0] == MAX_RETRY_WARNINGS:
            print("lvmtrain: further retries of remote reads are not printed", file=sys.stderr, flush=True)
