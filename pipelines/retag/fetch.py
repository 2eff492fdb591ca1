"""The fetch stage: catalog rows (image_id, uri) → raw bytes, or an error row (`not_found`, ...).

Runs as CPU tasks; each batch is read by `storage.read_many` (a bounded thread pool, one retry layer). A
failure of one object never fails the batch: it becomes `status = 'error'` with a one-line,
credential-free reason. A row with an `expect` fingerprint (`unchanged`: its catalog said nothing of the
object, and current holds its id at that uri) gets a metadata request first (HEAD, or a local stat) and is
skipped unread when the object is what current's row was made from.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..storage.files import NO_META, object_meta
from ..tables.schema import UTC_TS
from .unchanged import EXPECT, UNKNOWN, meta_fingerprints


@dataclass(frozen=True)
class FetchOptions:
    threads: int = 16  # concurrent reads per task (bounded: a task never opens more connections)
    max_bytes: int = storage.DEFAULT_MAX_BYTES
    retry: storage.RetryPolicy = field(default_factory=storage.RetryPolicy)
    roots: tuple[str, ...] | None = None  # local folders the catalog may point into (storage.confine)


def fetch_batch(batch: pa.Table, options: FetchOptions = FetchOptions()) -> pa.Table:
    """(image_id, uri, ...) → adds `data` (bytes, null on failure or when skipped unread), `status` (null,
    'error', or 'skipped'), `error`; drops `expect`."""
    uris = batch.column("uri").to_pylist()
    unread = np.zeros(len(uris), bool)
    if EXPECT in batch.column_names:
        batch, unread = _asked_first(batch, uris, options)
    to_read = [u for u, skip in zip(uris, unread, strict=True) if not skip]
    read = iter(storage.read_many(to_read, options.threads, options.max_bytes, options.retry, options.roots))
    results = [(None, None) if skip else next(read) for skip in unread]
    errors = [None if failure is None else str(failure) for _, failure in results]
    columns = {
        "data": pa.array([data for data, _ in results], pa.large_binary()),
        "status": pa.array(["skipped" if s else None if e is None else "error" for s, e in zip(unread, errors, strict=True)], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    out = batch.drop_columns([c for c in (*columns, EXPECT) if c in batch.column_names])
    for name, col in columns.items():
        out = out.append_column(name, col)
    return out


def _asked_first(batch: pa.Table, uris: list[str], options: FetchOptions) -> tuple[pa.Table, np.ndarray]:
    """One metadata request per row with an `expect`: what it says goes into size / etag / mtime (current
    keeps it for the next run), and the rows whose object matches `expect` are skipped unread."""
    expect = pc.fill_null(batch.column(EXPECT), UNKNOWN).to_numpy(zero_copy_only=False)  # not NaN: int64
    asked = np.flatnonzero(pc.is_valid(batch.column(EXPECT)).to_numpy(zero_copy_only=False))
    unread = np.zeros(batch.num_rows, bool)
    if len(asked) == 0:
        return batch, unread
    with ThreadPoolExecutor(min(options.threads, len(asked))) as pool:
        metas = list(pool.map(lambda i: object_meta(uris[i], options.roots), asked))
    sizes = batch.column("size").to_pylist()
    etags = batch.column("etag").to_pylist()
    mtimes = pc.cast(batch.column("mtime").cast(UTC_TS), pa.int64()).to_pylist()
    for i, meta in zip(asked, metas, strict=True):
        if meta != NO_META:
            sizes[i], etags[i], mtimes[i] = meta
    size, etag = pa.array(sizes, pa.int64()), pa.array(etags, pa.string())
    mtime = pa.array(mtimes, pa.int64()).cast(UTC_TS)
    fingerprints = meta_fingerprints(size.take(asked), etag.take(asked), mtime.take(asked))
    unread[asked] = (fingerprints != UNKNOWN) & (fingerprints == expect[asked])
    for name, col in (("size", size), ("etag", etag), ("mtime", mtime)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, col)
    return batch, unread
