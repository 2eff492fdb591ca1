"""The queue's input and output: the `current` rows a model tagged, read in batches down to the few that can
be queued, and the queue as an annotations-format CSV (`mumic train --annotations` reads it back).

The CSV's `labels` are the model's guess (every label at or above its threshold, best first); the extra
columns say what to check (`review_label`, its `score` and `threshold`) and are ignored by training.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pds

from .. import storage
from ..tables import arrow_dataset, current_uri, open_table
from .select import Pick, margins, shortlist

LABEL_SEPARATOR = "|"  # what the annotations reader splits a CSV `labels` cell on
COLUMNS = ("image_id", "uri", "scores", "model_name", "model_version")
QUEUE_COLUMNS = ("image_id", "uri", "labels", "review_label", "score", "threshold", "rank")


@dataclass(frozen=True)
class Candidates:
    """The `current` rows that can still be queued, and what the read saw."""

    image_ids: list[str]
    uris: list[str]
    scores: np.ndarray  # [M, C] float32, in the model's taxonomy order
    rows: int  # `ok` rows of current tagged by the model: what the queue chose from
    rows_other_model: int  # `ok` rows tagged by another model name or version (not comparable)


def _scores(batch: pa.RecordBatch, n_labels: int, where: str) -> np.ndarray:
    flat = batch.column("scores").flatten().to_numpy(zero_copy_only=False)
    if flat.size != batch.num_rows * n_labels:
        raise storage.StorageError(
            f"the scores in {where} do not have one value per label of the model ({n_labels}): "
            "retag with the model whose queue you want"
        )
    return flat.astype(np.float32).reshape(-1, n_labels)


def read_candidates(
    output: str,
    model: tuple[str, str],
    thresholds: np.ndarray,
    k: int,
    columns: Sequence[int],
    batch_rows: int = 65_536,
    on_batch: Callable[[int], None] | None = None,
) -> Candidates:
    """The `ok` rows of `current` tagged by `model` (name, version), streamed and cut down to the shortlist
    of a k-queue over `columns`, so memory holds about k rows per label whatever the table's size."""
    where = current_uri(output)
    table = open_table(where)
    if table is None:
        raise storage.StorageError(f"no current table in {output}: nothing retagged yet")
    condition = (pds.field("status") == "ok") & pds.field("scores").is_valid()
    ids: list[str] = []
    uris: list[str] = []
    scores = np.zeros((0, len(thresholds)), np.float32)
    rows = other = seen = 0
    for batch in arrow_dataset(table).to_batches(columns=list(COLUMNS), filter=condition, batch_size=batch_rows):
        mine = pc.and_(pc.equal(batch.column("model_name"), model[0]), pc.equal(batch.column("model_version"), model[1]))
        mine = pc.fill_null(mine, False)
        n_mine = int(pc.sum(mine).as_py() or 0)
        rows, other, seen = rows + n_mine, other + batch.num_rows - n_mine, seen + batch.num_rows
        if n_mine:
            batch = batch.filter(mine)
            ids += batch.column("image_id").to_pylist()
            uris += batch.column("uri").to_pylist()
            scores = np.concatenate([scores, _scores(batch, len(thresholds), where)])
            keep = shortlist(margins(scores, thresholds)[:, list(columns)], ids, k)
            ids, uris, scores = [ids[i] for i in keep], [uris[i] for i in keep], scores[keep]
        if on_batch is not None:
            on_batch(seen)
    return Candidates(ids, uris, scores, rows, other)


def queue_table(cands: Candidates, picks: Sequence[Pick], names: Sequence[str], thresholds: np.ndarray) -> pa.Table:
    """The queue, most uncertain first: one row per picked image, in QUEUE_COLUMNS."""
    rows = [p.row for p in picks]
    guesses = []
    for r in rows:
        s = cands.scores[r]
        above = [c for c in np.argsort(-s, kind="stable") if s[c] >= thresholds[c]]  # best first
        guesses.append(LABEL_SEPARATOR.join(names[c] for c in above))
    return pa.table(
        {
            "image_id": [cands.image_ids[r] for r in rows],
            "uri": [cands.uris[r] for r in rows],
            "labels": guesses,
            "review_label": [names[p.column] for p in picks],
            "score": [round(float(cands.scores[p.row, p.column]), 4) for p in picks],
            "threshold": [round(float(thresholds[p.column]), 4) for p in picks],
            "rank": list(range(1, len(picks) + 1)),
        }
    )


def write_csv(table: pa.Table, uri: str) -> None:
    """The queue as CSV at `uri` (local or s3://), whole or not at all."""
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
