"""The infer stage: decoded pixels → per-label scores, the chosen labels and an L2-normalised embedding.

`Predictor` is a callable class for `Dataset.map_batches` on an actor pool: a `mumic_core.scoring.Scorer`
is built once per actor in `__init__` (from a model folder, local or s3://) and each call maps a pyarrow
batch to a batch.
Rows that are not `ok` pass through with null scores, labels and embedding.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

from mumic_core.scoring import Scorer, select_labels

from ..tables import FLOATS_TYPE, LABEL_TYPE, LABELS_TYPE, UTC_TS
from .decode import pixels_of


def _list_array(values: pa.Array, counts: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A list column: row i holds counts[i] consecutive values when valid[i], else null."""
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(np.where(valid, counts, 0), out=offsets[1:])
    mask = pa.array(~valid) if not valid.all() else None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=type_, mask=mask)


class Predictor:
    """Callable class for map_batches: pyarrow batch (status, pixels, ...) → (…, labels, scores, embedding)."""

    def __init__(
        self,
        model_uri: str,
        top_k: int = 10,
        device: str | None = None,
        num_threads: int | None = None,
        precision: str = "auto",
        tally=None,
    ):
        """`device` comes from the plan ("cuda" for an actor that reserved a GPU, else "cpu"); a GPU actor
        whose torch cannot use CUDA fails here (DeviceError) rather than run on one CPU thread."""
        self.scorer = Scorer.load(model_uri, device=device, num_threads=num_threads, precision=precision)
        self.tally = tally  # the run's `dataset.Tally`: told of every batch, for the driver's progress
        self.top_k = int(top_k)
        self.label_names = pa.array(self.scorer.names, pa.string())
        self.num_labels = len(self.label_names)
        self.embed_dim = self.scorer.embed_dim
        # one image through the model now, while the first batches are still being fetched and decoded:
        # the first call's one-off costs (kernel selection, allocator, quantised weight packing) leave the
        # first output's path
        size = self.scorer.image_size
        self.scorer.predict(np.zeros((1, 3, size, size), np.uint8))
        if self.tally is not None:
            self.tally.ready.remote()  # fire and forget: the run's start-up steps (`actors_ready_seconds`)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok, pixels = pixels_of(batch, self.scorer.image_size)
        result = self.scorer.predict(pixels, batch_size=max(1, len(pixels)))
        scores, emb = result.scores, result.embeddings  # [n_ok, C], [n_ok, D]
        n = batch.num_rows
        idx, sel_scores, counts = select_labels(scores, result.thresholds, self.top_k)
        row_counts = np.zeros(n, np.int64)
        row_counts[ok] = counts
        labels_values = pa.StructArray.from_arrays(
            [self.label_names.take(pa.array(idx, pa.int64())), pa.array(sel_scores, pa.float32())],
            fields=list(LABEL_TYPE),
        )
        columns = {
            "labels": _list_array(labels_values, row_counts, ok, LABELS_TYPE),
            "scores": _list_array(
                pa.array(scores.reshape(-1), pa.float32()), np.full(n, self.num_labels), ok, FLOATS_TYPE
            ),
            "embedding": _list_array(
                pa.array(emb.reshape(-1), pa.float32()), np.full(n, self.embed_dim), ok, FLOATS_TYPE
            ),
            "processed_at": pa.nulls(n, UTC_TS).fill_null(pa.scalar(dt.datetime.now(dt.UTC), UTC_TS)),
        }
        out = batch.drop_columns([c for c in ("pixels", *columns) if c in batch.column_names])
        for name, col in columns.items():
            out = out.append_column(name, col)
        if self.tally is not None:
            self.tally.add.remote(n)  # fire and forget: the rows themselves never go to the driver
        return out
