"""Read side of the output tables: committed runs, the latest run, and embedding search (over `current`,
or one run of `tags`).

Readers only trust what `runs` lists: a run's tags are visible atomically, and its `runs` row follows.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from .. import storage
from .delta import arrow_dataset, open_table
from .schema import OBJECT_COLUMNS, RUNS_SCHEMA


def tags_uri(output: str) -> str:
    return storage.join(output, "tags")


def runs_uri(output: str) -> str:
    return storage.join(output, "runs")


def current_uri(output: str) -> str:
    return storage.join(output, "current")


def list_runs(output: str) -> pa.Table:
    """Every committed run, oldest first (an empty table with the runs schema when there are none)."""
    table = open_table(runs_uri(output))
    if table is None:
        return RUNS_SCHEMA.empty_table()
    runs = arrow_dataset(table).to_table()
    return runs.sort_by([("finished_at", "ascending"), ("run_id", "ascending")])


def latest_run(output: str) -> dict | None:
    runs = list_runs(output)
    if runs.num_rows == 0:
        return None
    return runs.slice(runs.num_rows - 1).to_pylist()[0]


def get_run(output: str, run_id: str) -> dict | None:
    runs = list_runs(output)
    rows = [r for r in runs.to_pylist() if r["run_id"] == run_id]
    return rows[0] if rows else None


def search_embeddings(
    output: str,
    query: np.ndarray,
    k: int = 20,
    run_id: str | None = None,
    model: tuple[str, str] | None = None,
) -> tuple[dict, list[dict]]:
    """Top-k images by cosine similarity to `query` [D]: over `current` (every image's labels now; the
    default) or over one committed run's `ok` rows of `tags` (`run_id`). With `model` = (name, version),
    only images embedded by that model are searched (embeddings of different models do not compare).

    Streams the rows in batches and keeps a running top-k, so memory stays flat for big tables. Returns
    (what was searched: source, rows, rows_other_model; hits best first: image_id, uri, score, labels).
    """
    if run_id:
        run = get_run(output, run_id)
        if run is None:
            raise storage.StorageError(f"no committed run {run_id!r} in {output}")
        table, source = open_table(tags_uri(output)), f"run {run_id} ({run['run_date']})"
        condition = (pds.field("run_date") == run["run_date"]) & (pds.field("run_id") == run_id)
        condition &= pds.field("status") == "ok"
    else:
        table, source = open_table(current_uri(output)), "current"
        condition = pds.field("embedding").is_valid()
    if table is None:
        raise storage.StorageError(f"no {'tags' if run_id else 'current'} table in {output}: nothing retagged yet")
    q = np.asarray(query, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    columns = ["image_id", "uri", "embedding", "labels", "model_name", "model_version"]
    top = _TopK(k)
    searched = other = 0
    for batch in arrow_dataset(table).to_batches(columns=columns, filter=condition):
        if model is not None:
            mine = pc.and_(pc.equal(batch.column("model_name"), model[0]), pc.equal(batch.column("model_version"), model[1]))
            other += batch.num_rows - int(pc.sum(mine).as_py() or 0)
            batch = batch.filter(mine)
        if batch.num_rows:
            searched += batch.num_rows
            top.add(batch, _embeddings(batch, q.shape[0], source) @ q)
    return {"source": source, "rows": searched, "rows_other_model": other}, top.hits()


def _embeddings(batch: pa.RecordBatch, dim: int, source: str) -> np.ndarray:
    col = batch.column("embedding")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if flat.size != batch.num_rows * dim:
        raise storage.StorageError(
            f"the embeddings of {source} are not {dim}-d like the model's: search with the model that made them"
        )
    return flat.reshape(-1, dim)


class _TopK:
    """A running top-k over batches (a min-heap of (score, arrival, row))."""

    def __init__(self, k: int):
        self.k, self.heap, self.seq = k, [], 0

    def add(self, batch: pa.RecordBatch, sims: np.ndarray) -> None:
        for i in np.argsort(-sims)[: self.k]:
            s = float(sims[i])
            if len(self.heap) == self.k and s <= self.heap[0][0]:
                break
            row = {
                "image_id": batch.column("image_id")[int(i)].as_py(),
                "uri": batch.column("uri")[int(i)].as_py(),
                "score": s,
                "labels": [x["label"] for x in batch.column("labels")[int(i)].as_py() or []],
            }
            self.seq += 1
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, (s, self.seq, row))
            else:
                heapq.heapreplace(self.heap, (s, self.seq, row))

    def hits(self) -> list[dict]:
        return [row for _, _, row in sorted(self.heap, key=lambda t: (-t[0], t[1]))]


# The skip reads stream a whole table once, at night, into a compact index: small batches and little
# read-ahead keep their peak memory near the index's own (-40 % at 3 M rows, for ~15 % more time).
SKIP_SCAN = {"batch_size": 65_536, "fragment_readahead": 1, "batch_readahead": 2}


def iter_ok_hashes(tags_uri: str, model_name: str, model_version: str) -> Iterator[pa.Array]:
    """content_sha256 of every row tagged `ok` by this model name+version in a committed run, in batches."""
    table = open_table(tags_uri)
    if table is None:
        return
    ds = arrow_dataset(table)
    condition = (
        (pds.field("model_name") == model_name)
        & (pds.field("model_version") == model_version)
        & (pds.field("status") == "ok")
    )
    for batch in ds.to_batches(columns=["content_sha256"], filter=condition, **SKIP_SCAN):
        if batch.num_rows:
            yield batch.column(0)


def iter_known_objects(
    current_uri: str, model_name: str, model_version: str, taxonomy_sha256: str
) -> Iterator[pa.RecordBatch]:
    """(image_id, uri, size, etag, mtime) of the `current` rows a run may skip by size and ETag / mtime:
    status ok, labels from this model name+version and taxonomy. Nothing from a table written before
    those columns existed (its next update adds them)."""
    table = open_table(current_uri)
    if table is None:
        return
    names = set(table.schema().to_arrow().names)
    columns = ["image_id", "uri", *OBJECT_COLUMNS]
    if not names.issuperset(columns):
        return
    condition = (
        (pds.field("status") == "ok")
        & pds.field("labels").is_valid()
        & (pds.field("model_name") == model_name)
        & (pds.field("model_version") == model_version)
        & (pds.field("taxonomy_sha256") == taxonomy_sha256)
    )
    for batch in arrow_dataset(table).to_batches(columns=columns, filter=condition, **SKIP_SCAN):
        if batch.num_rows:
            yield batch
