"""The fetch stage: catalog rows (image_id, uri) → raw bytes, or an error row (`not_found`, ...).

Runs as CPU tasks; each batch is read by `storage.read_many` (a bounded thread pool, one retry layer). A
failure of one object never fails the batch: it becomes `status = 'error'` with a one-line,
credential-free reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from .. import storage


@dataclass(frozen=True)
class FetchOptions:
    threads: int = 16  # concurrent reads per task (bounded: a task never opens more connections)
    max_bytes: int = storage.DEFAULT_MAX_BYTES
    retry: storage.RetryPolicy = field(default_factory=storage.RetryPolicy)
    roots: tuple[str, ...] | None = None  # local folders the catalog may point into (storage.confine)


def fetch_batch(batch: pa.Table, options: FetchOptions = FetchOptions()) -> pa.Table:
    """(image_id, uri, ...) → adds `data` (bytes, null on failure), `status` (null, or 'error'), `error`."""
    results = storage.read_many(
        batch.column("uri").to_pylist(), options.threads, options.max_bytes, options.retry, options.roots
    )
    errors = [None if failure is None else str(failure) for _, failure in results]
    columns = {
        "data": pa.array([data for data, _ in results], pa.large_binary()),
        "status": pa.array([None if e is None else "error" for e in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    out = batch.drop_columns([c for c in columns if c in batch.column_names])
    for name, col in columns.items():
        out = out.append_column(name, col)
    return out
