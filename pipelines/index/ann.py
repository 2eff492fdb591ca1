"""The approximate nearest-neighbour index itself: a usearch HNSW graph over L2-normalised embeddings,
with the parameters every build, update, search and benchmark uses.

usearch (Apache-2.0, released monthly) because it does what the catalog needs in one small wheel: keys can
be removed and added in place (a nightly run changes ~1 % of the rows, so updates beat rebuilds), vectors
are stored as float16 (half of float32's memory; recall@20 0.996 on 200 000 clustered 512-d vectors, where
int8 capped it near 0.97), and a saved index is one file that can be memory-mapped for search (`view`).
Figures: tests/benchmarks/RESULTS-search.md.
faiss has no removal from its HNSW index and needs training for its compressed ones; hnswlib had no
release since 2023; voyager only marks deletions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
from usearch.index import Index


@dataclass(frozen=True)
class AnnParams:
    """How the graph is built and searched (recorded in each index's manifest)."""

    metric: str = "cos"  # distance = 1 - cosine similarity
    dtype: str = "f16"  # how vectors are stored
    connectivity: int = 16  # edges per node: more = better recall, more memory, slower builds
    expansion_add: int = 40  # candidates kept while inserting: 64 doubled the build's CPU for no recall gain
    expansion_search: int = 256  # candidates kept while searching: at 1 M rows recall@20 0.88 at 64, 0.955 at 256 (RESULTS-search.md)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AnnParams:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


PARAMS = AnnParams()
# Up to this many vectors a search scans them all (exact): 2.8 ms a query at 20 000 x 512 here, against
# 1.5 ms through the graph, whose recall on small clustered sets is not 1 (a multi-threaded build differs
# from run to run). Above it the graph's speed is worth its recall (RESULTS-search.md).
EXACT_UP_TO = 20_000


def threads() -> int:
    return os.cpu_count() or 1


def new_index(dim: int, params: AnnParams = PARAMS) -> Index:
    return Index(
        ndim=dim,
        metric=params.metric,
        dtype=params.dtype,
        connectivity=params.connectivity,
        expansion_add=params.expansion_add,
        expansion_search=params.expansion_search,
    )


def add(index: Index, keys: np.ndarray, vectors: np.ndarray) -> None:
    """Add vectors [N, D] under new keys [N] (uint64)."""
    if len(keys):
        index.add(np.asarray(keys, np.uint64), np.ascontiguousarray(vectors, np.float32), threads=threads())


def remove(index: Index, keys: np.ndarray) -> None:
    if len(keys):
        index.remove(np.asarray(keys, np.uint64))


def knn(index: Index, queries: np.ndarray, k: int, exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys [Q, k], cosine similarities [Q, k]) of the k nearest stored vectors of each query, best
    first; a query with fewer than k neighbours has similarity -inf in the missing places. `exact`: scan
    every vector instead of the graph (None: when the index holds at most EXACT_UP_TO)."""
    queries = np.atleast_2d(np.ascontiguousarray(queries, np.float32))
    if len(index) == 0:
        return np.zeros((len(queries), 0), np.uint64), np.zeros((len(queries), 0), np.float32)
    exact = len(index) <= EXACT_UP_TO if exact is None else exact
    found = index.search(queries, min(k, len(index)), threads=threads(), exact=exact)
    keys, sims = np.atleast_2d(found.keys), 1.0 - np.atleast_2d(found.distances).astype(np.float32)
    counts = getattr(found, "counts", [keys.shape[1]])  # one query: `Matches`, holding only what it found
    missing = np.arange(keys.shape[1])[None, :] >= np.atleast_1d(counts)[:, None]
    sims[missing] = -np.inf
    return keys, sims


def vectors(index: Index, keys: np.ndarray) -> np.ndarray:
    """The stored vectors of these keys [N, D] as float32, L2-normalised again (float16 storage rounds
    them a little)."""
    if not len(keys):
        return np.zeros((0, index.ndim), np.float32)
    got = index.get(np.asarray(keys, np.uint64), dtype=np.float32)
    out = np.stack(got) if isinstance(got, tuple) else np.atleast_2d(got)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def save(index: Index, path: str | None = None) -> bytes | None:
    """Into a local file, or as bytes (for an object store)."""
    if path is not None:
        index.save(path)
        return None
    return bytes(index.save())


def load(source: str | bytes, params: AnnParams, view: bool = False) -> Index:
    """A saved index from a local file or its bytes; `view` memory-maps a file instead of reading it
    (read-only: for search; bytes are always copied in, so nothing points into a buffer that goes away).
    The search and add expansions are not saved with the graph: they are set again here."""
    index = Index.restore(source, view=view and isinstance(source, str))
    if index is None:
        raise ValueError("not a usearch index")
    index.expansion_search = params.expansion_search
    index.expansion_add = params.expansion_add
    return index
