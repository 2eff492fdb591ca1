"""Unchanged images, found before any GET: a catalog row whose image_id, uri, size and ETag (S3) or
modification time (local) equal its `current` row's, tagged ok by this model version and taxonomy.

`KnownObjects` indexes those `current` rows as 128-bit fingerprints of (image_id, uri) and 64-bit ones of
(size, etag, mtime): 24 bytes a row, sorted, looked up by a vectorised binary search. `split` streams a
catalog snapshot through it: unchanged rows are staged as skipped without a download; the rest go to the
pipeline, those whose catalog row says nothing of the object (a manifest without size / etag) with the
fingerprint a metadata request (HEAD, or a local stat) must match for the fetch stage to skip them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .catalog import CATALOG_SCHEMA, OBJECT_SCHEMA, conform

EXPECT = "expect"  # int64: the object fingerprint current holds for the row; null: no metadata request
TODO_SCHEMA = CATALOG_SCHEMA.append(pa.field(EXPECT, pa.int64()))
UNKNOWN = 0  # the object fingerprint of a row whose size, or both its ETag and mtime, are unknown


SLICE = 65_536  # rows turned into Python bytes at a time (bounded memory, whatever the batch size)


def _blake(values: pa.Array, size: int) -> bytes:
    """BLAKE2b digests of `size` bytes of each binary value, concatenated."""
    out = []
    for start in range(0, len(values), SLICE):
        chunk = values.slice(start, SLICE).to_pylist()
        out.append(b"".join([hashlib.blake2b(v, digest_size=size).digest() for v in chunk]))
    return b"".join(out)


def _as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def key_fingerprints(ids: pa.Array, uris: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 [N]: BLAKE2b-128 of image_id NUL uri (neither can hold a NUL: both are text)."""
    if len(ids) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    joined = pc.binary_join_element_wise(_as_array(ids), _as_array(uris), "\x00").cast(pa.binary())
    both = np.frombuffer(_blake(joined, 16), np.uint64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def meta_fingerprints(size: pa.Array, etag: pa.Array, mtime: pa.Array) -> np.ndarray:
    """int64 [N]: BLAKE2b-64 of size NUL etag NUL mtime (µs); UNKNOWN where the size, or both the ETag and
    the mtime, are null (nothing to compare: never equal)."""
    size, etag, mtime = (_as_array(c) for c in (size, etag, mtime))
    n = len(size)
    known = pc.and_(pc.is_valid(size), pc.or_(pc.is_valid(etag), pc.is_valid(mtime)))
    out = np.full(n, UNKNOWN, np.int64)
    if n == 0 or not pc.any(known).as_py():
        return out
    mtime_us = pc.cast(pc.cast(mtime, pa.timestamp("us", tz="UTC")), pa.int64())
    text = pc.binary_join_element_wise(
        pc.cast(size, pa.string()), pc.fill_null(etag, ""), pc.fill_null(pc.cast(mtime_us, pa.string()), ""), "\x00"
    )
    rows = np.flatnonzero(known.to_numpy(zero_copy_only=False))
    digests = np.frombuffer(_blake(text.filter(known).cast(pa.binary()), 8), np.int64)
    out[rows] = np.where(digests == UNKNOWN, 1, digests)  # UNKNOWN stays reserved
    return out


def meta_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    n = batch.num_rows
    cols = [batch.column(f.name) if f.name in batch.schema.names else pa.nulls(n, f.type) for f in OBJECT_SCHEMA]
    return meta_fingerprints(*cols)


class KnownObjects:
    """The `current` rows an unchanged catalog row may be skipped against, as sorted fingerprints."""

    def __init__(self, hi: np.ndarray, lo: np.ndarray, meta: np.ndarray, presorted: bool = False):
        if not presorted:
            order = np.argsort(hi, kind="stable")
            hi, lo, meta = hi[order], lo[order], meta[order]
        self.hi, self.lo, self.meta = hi, lo, meta

    def __len__(self) -> int:
        return len(self.hi)

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes + self.meta.nbytes

    @classmethod
    def from_batches(cls, batches: Iterable[pa.RecordBatch]) -> KnownObjects:
        """From batches of (image_id, uri, size, etag, mtime): `tables.iter_known_objects`."""
        his, los, metas = [], [], []
        for batch in batches:
            hi, lo = key_fingerprints(batch.column("image_id"), batch.column("uri"))
            his.append(hi)
            los.append(lo)
            metas.append(meta_of(batch))
        if not his:
            return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
        # one array at a time, each batch's pieces dropped as soon as they are joined: the peak stays near
        # the index's own size (24 bytes a row) rather than three times it
        hi = np.concatenate(his)
        his.clear()
        order = np.argsort(hi, kind="stable")
        hi = hi[order]
        columns = [hi]
        for parts in (los, metas):
            joined = np.concatenate(parts)
            parts.clear()
            columns.append(joined[order])
            del joined
        return cls(*columns, presorted=True)

    def lookup(self, ids: pa.Array, uris: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [N], the stored object fingerprint int64 [N], UNKNOWN where not found)."""
        hi, lo = key_fingerprints(ids, uris)
        if len(self.hi) == 0 or len(hi) == 0:
            return np.zeros(len(hi), bool), np.full(len(hi), UNKNOWN, np.int64)
        # two keys with the same high half: the search lands on one, and the other is not found (a GET)
        pos = np.minimum(np.searchsorted(self.hi, hi), len(self.hi) - 1)
        found = (self.hi[pos] == hi) & (self.lo[pos] == lo)
        return found, np.where(found, self.meta[pos], UNKNOWN)

    def classify(self, batch: pa.RecordBatch) -> tuple[np.ndarray, pa.Array]:
        """(unchanged bool [N], the `expect` column: the stored fingerprint where the catalog row says
        nothing of the object but current holds the id at the same uri, else null)."""
        found, stored = self.lookup(batch.column("image_id"), batch.column("uri"))
        listed = meta_of(batch)
        unchanged = found & (stored != UNKNOWN) & (listed == stored)
        ask = found & (listed == UNKNOWN)
        return unchanged, pa.array(stored, pa.int64(), mask=~ask)


def skipped_rows(rows: pa.RecordBatch) -> pa.Table:
    """Catalog rows → rows the staging writes as skipped: no hash (never read), status 'skipped'."""
    n = rows.num_rows
    table = pa.Table.from_batches([rows.select(CATALOG_SCHEMA.names)])
    table = table.append_column("content_sha256", pa.nulls(n, pa.string()))
    return table.append_column("status", pa.array(["skipped"] * n, pa.string()))


def split(
    batches: Iterable[pa.RecordBatch], known: KnownObjects, on_unchanged: Callable[[pa.Table], None]
) -> Iterator[pa.RecordBatch]:
    """The rows still to fetch, with their `expect` column; the unchanged ones go to `on_unchanged`."""
    for batch in batches:
        batch = conform(batch)  # a snapshot staged before size / etag / mtime existed lacks them
        unchanged, expect = known.classify(batch)
        if unchanged.any():
            on_unchanged(skipped_rows(batch.filter(pa.array(unchanged))))
        rest = pa.RecordBatch.from_arrays([*batch.columns, expect], schema=TODO_SCHEMA).filter(pa.array(~unchanged))
        if rest.num_rows:
            yield rest

