"""`mumic duplicates`: groups of images of `current` whose embeddings are closer than a threshold, found
through the model's index, written as the Delta table `duplicates` (replaced by each invocation).

Each image asks the index for its `neighbours` nearest images; every pair at or above the threshold
(cosine similarity) is an edge, and so is every pair with the same bytes (content_sha256); a group is a
connected component of that graph with two or more images. So a member joined through another member may
be less similar than the threshold to the group's first image (its lowest image_id), which its
`similarity` column shows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import storage
from ..progress import Progress
from ..tables import latest_run
from ..tables.schema import DUPLICATES_SCHEMA
from . import ann
from .build import refresh
from .store import IndexUnavailable, Model, read_mapping

CHUNK = 16_384  # images whose neighbours are asked for at once


@dataclass(frozen=True)
class Found:
    table: pa.Table  # DUPLICATES_SCHEMA rows: group 1 (the largest) first, each group's first image first
    images: int  # images searched
    uri: str  # where the table was written

    @property
    def groups(self) -> int:
        return len(set(self.table.column("group_id").to_pylist()))


def duplicates_uri(output: str) -> str:
    return storage.join(output, "duplicates")


def find_duplicates(
    output: str, model: Model, threshold: float, neighbours: int = 16, say: Progress | None = None
) -> Found:
    """Bring the model's index up to date, find the groups, and replace the `duplicates` table."""
    done = refresh(output, model, say)
    if done is None:
        raise IndexUnavailable(f"no image of current in {storage.redact(output)} was embedded by {model[0]}/{model[1]}")
    mapping = read_mapping(output, done.manifest, columns=["key", "image_id", "uri", "content_sha256"])
    keys = mapping.column("key").to_numpy()
    a, b = _near_pairs(done.index, keys, threshold, neighbours, say)
    sa, sb = _same_bytes_pairs(mapping.column("content_sha256"))
    a, b = np.concatenate([a, sa]), np.concatenate([b, sb])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(keys), len(keys)))
    component = connected_components(graph, directed=False)[1] if len(keys) else np.zeros(0, np.int64)
    table = _groups(done.index, mapping, component)
    run = latest_run(output)
    constants = {
        "model_name": model[0],
        "model_version": model[1],
        "threshold": float(threshold),
        "current_version": int(done.manifest["current_version"]),
        "run_id": run["run_id"] if run else None,
        "computed_at": dt.datetime.now(dt.UTC),
    }
    for name, value in constants.items():
        table = table.append_column(name, pa.array([value] * table.num_rows, DUPLICATES_SCHEMA.field(name).type))
    table = table.select(DUPLICATES_SCHEMA.names).cast(DUPLICATES_SCHEMA)
    uri = duplicates_uri(output)
    write_deltalake(uri, table, mode="overwrite", schema_mode="overwrite", storage_options=storage.delta_storage_options(uri))
    return Found(table, len(keys), uri)


def _near_pairs(index, keys: np.ndarray, threshold: float, neighbours: int, say) -> tuple[np.ndarray, np.ndarray]:
    """(row, row) positions in `keys` (sorted) of the pairs at or above the threshold."""
    a, b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        found, sims = ann.knn(index, ann.vectors(index, chunk), neighbours + 1)  # +1: itself
        near = (sims >= threshold) & (found != chunk[:, None])
        rows = np.broadcast_to(np.arange(start, start + len(chunk))[:, None], found.shape)
        a.append(rows[near])
        b.append(np.searchsorted(keys, found[near]))
        if say is not None:
            say.every(10, f"duplicates: neighbours of {start + len(chunk)}/{len(keys)} images", key="dup")
    return np.concatenate(a), np.concatenate(b)


def _same_bytes_pairs(sha: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours in content_sha256 order with equal hashes: enough edges to join each set of copies."""
    sha = sha.combine_chunks() if isinstance(sha, pa.ChunkedArray) else sha
    order = pc.array_sort_indices(sha, null_placement="at_end")
    ordered = sha.take(order)
    equal = pc.fill_null(pc.equal(ordered[1:], ordered[:-1]), False).to_numpy(zero_copy_only=False)
    order = order.to_numpy().astype(np.int64)
    return order[:-1][equal], order[1:][equal]


def _groups(index, mapping: pa.Table, component: np.ndarray) -> pa.Table:
    """One row per image in a component of two or more: group id (by size, then first image_id), size,
    image, first image, similarity to it, and whether another member has the same bytes."""
    sizes = np.bincount(component)
    members = np.flatnonzero(sizes[component] >= 2)
    rows = mapping.take(pa.array(members)).append_column("component", pa.array(component[members]))
    rows = rows.append_column("group_size", pa.array(sizes[component[members]], pa.int64()))
    rows = rows.sort_by([("component", "ascending"), ("image_id", "ascending")])
    comp = rows.column("component").to_numpy()
    starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]]) if len(comp) else np.zeros(0, np.int64)
    group_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(comp)]).astype(np.int64))
    first_ids = rows.column("image_id").take(pa.array(starts, pa.int64())).to_pylist()
    by_size = sorted(range(len(starts)), key=lambda g: (-int(sizes[comp[starts[g]]]), first_ids[g]))
    group_id = np.empty(len(starts), np.int64)
    group_id[by_size] = np.arange(1, len(starts) + 1)
    first_row = starts[group_of_row]  # the row of each row's first image
    vectors = ann.vectors(index, rows.column("key").to_numpy())
    similarity = np.clip(np.einsum("ij,ij->i", vectors, vectors[first_row]), -1.0, 1.0) if len(comp) else np.zeros(0)
    is_first = first_row == np.arange(len(comp))
    similarity[is_first] = 1.0
    rows = rows.append_column("group_id", pa.array(group_id[group_of_row], pa.int64()))
    rows = rows.append_column("first_image_id", rows.column("image_id").take(pa.array(first_row, pa.int64())))
    rows = rows.append_column("similarity", pa.array(similarity.astype(np.float32)))
    rows = rows.append_column("exact_duplicate", _shares_bytes(rows))
    rows = rows.append_column("is_first", pa.array(is_first, pa.bool_()))
    order = [("group_id", "ascending"), ("is_first", "descending"), ("similarity", "descending"), ("image_id", "ascending")]
    return rows.sort_by(order)


def _shares_bytes(rows: pa.Table) -> pa.Array:
    """True where another row of the same component has the same content_sha256."""
    counts = rows.group_by(["component", "content_sha256"]).aggregate([("image_id", "count")])
    many = counts.filter(pc.greater(counts.column("image_id_count"), 1))
    key = pc.binary_join_element_wise(
        pc.cast(rows.column("component"), pa.string()), rows.column("content_sha256"), ":"
    )
    many_key = pc.binary_join_element_wise(
        pc.cast(many.column("component"), pa.string()), many.column("content_sha256"), ":"
    )
    return pc.fill_null(pc.is_in(key, value_set=many_key), False)
