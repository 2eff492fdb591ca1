"""Order-independent fingerprints of sets of image ids (the sum of their 64-bit hashes, mod 2**64): the
catalog snapshot and every staged part carry one, so exactly-once is checked in O(parts), not O(rows)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

HASH = "blake2b64-sum"  # recorded with each fingerprint: one made another way is never compared with it
SLICE = 65_536  # ids turned into Python bytes at a time (bounded memory, whatever the batch size)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 [N]: BLAKE2b-64 of each id's UTF-8 bytes (stable across versions, unlike polars' hash)."""
    values = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    values = values.cast(pa.binary())
    digest = hashlib.blake2b
    out = [
        b"".join([digest(v, digest_size=8).digest() for v in values.slice(start, SLICE).to_pylist()])
        for start in range(0, len(values), SLICE)
    ]
    return np.frombuffer(b"".join(out), np.uint64)


def fingerprint(ids: pa.Array | pa.ChunkedArray) -> str:
    """The fingerprint of a set of ids: `blake2b64-sum:<16 hex digits>`."""
    return _format(int(id_hashes(ids).sum(dtype=np.uint64)))


def combine(fingerprints: Iterable[str | None]) -> str | None:
    """The fingerprint of the union of disjoint sets (a multiset: an id twice counts twice); None when one
    is missing or made another way (then only the exact check can tell)."""
    total = 0
    for fp in fingerprints:
        if not fp or not fp.startswith(HASH + ":"):
            return None
        total += int(fp.split(":", 1)[1], 16)
    return _format(total)


def _format(total: int) -> str:
    return f"{HASH}:{total % (1 << 64):016x}"
