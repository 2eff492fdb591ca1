"""The fetch stage: catalog rows (image_id, uri) → raw bytes, or an error row (`not_found`, ...).

Runs as CPU tasks; each batch is read with a bounded thread pool (object stores are latency-bound), and
throttling / transient failures are retried with exponential backoff. A failure of one object never fails
the batch: it becomes `status = 'error'` with a one-line, credential-free reason.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from . import arrow_fs, storage

DEFAULT_MAX_BYTES = 256 << 20  # no catalog image is this big; a file that is would exhaust worker memory

# Substrings of S3 / network errors worth retrying (AWS SDK error names and HTTP statuses as pyarrow and
# the SDK print them).
_TRANSIENT_MARKERS = (
    "slow_down",
    "slowdown",
    "throttl",
    "toomanyrequests",
    "too many requests",
    "requesttimeout",
    "request timeout",
    "service_unavailable",
    "serviceunavailable",
    "internal_failure",
    "internalerror",
    "network_connection",
    "connection",
    "timed out",
    "timeout",
    "broken pipe",
    "reset by peer",
    " 500",
    " 502",
    " 503",
    " 504",
    "code: 500",
    "code: 502",
    "code: 503",
    "code: 504",
)
_NOT_FOUND_MARKERS = (
    "no_such_key",
    "nosuchkey",
    "no_such_bucket",
    "nosuchbucket",
    "not found",
    "does not exist",
    "404",
)
_DENIED_MARKERS = (
    "access_denied",
    "accessdenied",
    "forbidden",
    "403",
    "permission denied",
    "invalidaccesskeyid",
)


@dataclass(frozen=True)
class FetchOptions:
    threads: int = 16  # concurrent reads per task (bounded: a task never opens more connections)
    max_bytes: int = DEFAULT_MAX_BYTES
    retries: int = 5  # extra attempts for throttling / transient errors
    backoff_s: float = 0.2  # first retry delay; doubles each attempt (with jitter)
    max_backoff_s: float = 20.0


class FetchFailed(Exception):
    def __init__(self, reason: str, detail: str, transient: bool = False):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = " ".join(storage.redact(detail).split())
        self.transient = transient

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def classify(exc: BaseException, uri: str) -> FetchFailed:
    """Map a filesystem / SDK exception to a short reason; `transient` ones are retried."""
    if isinstance(exc, FetchFailed):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    where = storage.redact(uri)
    if isinstance(exc, IsADirectoryError):
        return FetchFailed("not_found", f"{where} is a folder, not a file")
    if isinstance(exc, FileNotFoundError) or any(m in low for m in _NOT_FOUND_MARKERS):
        return FetchFailed("not_found", where)
    if isinstance(exc, PermissionError) or any(m in low for m in _DENIED_MARKERS):
        return FetchFailed("access_denied", f"{where}: {text.splitlines()[0]}")
    if isinstance(exc, ConnectionError | TimeoutError) or any(m in low for m in _TRANSIENT_MARKERS):
        return FetchFailed("unavailable", f"{where}: {text.splitlines()[0]}", transient=True)
    return FetchFailed("unreadable", f"{where}: {text.splitlines()[0]}")


def read_object(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """All bytes of one local file or S3 object (one GET), refusing anything above max_bytes."""
    fs, path = arrow_fs.filesystem(uri)
    if isinstance(fs, arrow_fs.pafs.LocalFileSystem):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise FetchFailed("too_large", f"{size} bytes > limit {max_bytes}")
            return f.read()
    with fs.open_input_stream(path) as f:  # a streaming GET: no HEAD round trip first
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FetchFailed("too_large", f"more than {max_bytes} bytes")
    return data


def fetch_one(
    uri: str, options: FetchOptions = FetchOptions(), sleep: Callable[[float], None] | None = None
) -> bytes:
    """read_object with retries (exponential backoff with jitter) on transient failures."""
    sleep = sleep or time.sleep
    attempt = 0
    while True:
        try:
            return read_object(uri, options.max_bytes)
        except Exception as e:  # classified below; anything unknown becomes `unreadable`, not a crash
            failure = classify(e, uri)
            if not failure.transient or attempt >= options.retries:
                if failure.transient:
                    failure.detail = f"{failure.detail} (gave up after {attempt + 1} attempts)"
                raise failure from None
        delay = min(options.max_backoff_s, options.backoff_s * (2**attempt))
        sleep(delay * (0.5 + random.random() / 2))
        attempt += 1


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)  # one pool per worker process, reused by every batch it runs
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="mumic-fetch")
        return pool


def fetch_batch(batch: pa.Table, options: FetchOptions = FetchOptions()) -> pa.Table:
    """(image_id, uri, ...) → adds `data` (bytes, null on failure), `status` (null, or 'error'), `error`."""
    uris = batch.column("uri").to_pylist()

    def one(uri: str) -> tuple[bytes | None, str | None]:
        try:
            return fetch_one(uri, options), None
        except FetchFailed as e:
            return None, str(e)

    if options.threads > 1 and len(uris) > 1:
        results = list(_pool(options.threads).map(one, uris))
    else:
        results = [one(u) for u in uris]
    data = pa.array([r[0] for r in results], pa.large_binary())
    errors = [r[1] for r in results]
    status = pa.array([None if e is None else "error" for e in errors], pa.string())
    out = batch
    for name, col in (("data", data), ("status", status), ("error", pa.array(errors, pa.string()))):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, col)
    return out
