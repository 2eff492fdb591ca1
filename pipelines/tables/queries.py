"""Read side of the output tables: committed runs, the latest run, and embedding search over a run.

Readers only trust what `runs` lists: a run's tags are visible atomically, and its `runs` row follows.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds

from .. import storage
from .delta import open_table
from .schema import RUNS_SCHEMA


def tags_uri(output: str) -> str:
    return storage.join(output, "tags")


def runs_uri(output: str) -> str:
    return storage.join(output, "runs")


def list_runs(output: str) -> pa.Table:
    """Every committed run, oldest first (an empty table with the runs schema when there are none)."""
    table = open_table(runs_uri(output))
    if table is None:
        return RUNS_SCHEMA.empty_table()
    runs = table.to_pyarrow_table()
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
    output: str, query: np.ndarray, k: int = 20, run_id: str | None = None
) -> tuple[dict, list[dict]]:
    """Top-k `ok` rows of a committed run (default: the latest) by cosine similarity to `query` [D].

    Streams the run's rows in batches and keeps a running top-k, so memory stays flat for big runs.
    Returns (run row, hits best first: image_id, uri, score, labels).
    """
    run = get_run(output, run_id) if run_id else latest_run(output)
    if run is None:
        raise storage.StorageError(
            f"no committed run {run_id!r} in {output}" if run_id else f"no committed runs in {output}"
        )
    table = open_table(tags_uri(output))
    if table is None:
        raise storage.StorageError(f"no tags table in {output}")
    q = np.asarray(query, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    ds = table.to_pyarrow_dataset()
    condition = (
        (pds.field("run_date") == run["run_date"])
        & (pds.field("run_id") == run["run_id"])
        & (pds.field("status") == "ok")
    )
    heap: list[tuple[float, int, dict]] = []
    seq = 0
    for batch in ds.to_batches(columns=["image_id", "uri", "embedding", "labels"], filter=condition):
        if batch.num_rows == 0:
            continue
        emb_col = batch.column("embedding")
        dim = len(emb_col[0].as_py())
        emb = emb_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        if dim != q.shape[0]:
            raise storage.StorageError(
                f"embedding size {dim} of run {run['run_id']} differs from the model's {q.shape[0]}: "
                "search with the model that produced the run"
            )
        sims = emb @ q
        top = np.argsort(-sims)[:k]
        for i in top:
            s = float(sims[i])
            if len(heap) < k or s > heap[0][0]:
                row = {
                    "image_id": batch.column("image_id")[int(i)].as_py(),
                    "uri": batch.column("uri")[int(i)].as_py(),
                    "score": s,
                    "labels": [x["label"] for x in batch.column("labels")[int(i)].as_py() or []],
                }
                seq += 1
                item = (s, seq, row)
                if len(heap) < k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heapreplace(heap, item)
    hits = [row for _, _, row in sorted(heap, key=lambda t: (-t[0], t[1]))]
    return run, hits


def iter_ok_hashes(tags_uri: str, model_name: str, model_version: str) -> Iterator[pa.Array]:
    """content_sha256 of every row tagged `ok` by this model name+version in a committed run, in batches."""
    table = open_table(tags_uri)
    if table is None:
        return
    ds = table.to_pyarrow_dataset()
    condition = (
        (pds.field("model_name") == model_name)
        & (pds.field("model_version") == model_version)
        & (pds.field("status") == "ok")
    )
    for batch in ds.to_batches(columns=["content_sha256"], filter=condition):
        if batch.num_rows:
            yield batch.column(0)
