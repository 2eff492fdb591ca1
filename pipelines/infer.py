"""The infer stage: decoded pixels → per-label scores, the chosen labels and an L2-normalised embedding.

`Predictor` is a callable class for `Dataset.map_batches` on an actor pool: the model is built once per
actor in `__init__` (from a model folder, local or s3://) and each call maps a pyarrow batch to a batch.
Rows that are not `ok` pass through with null scores, labels and embedding.
"""

from __future__ import annotations

import contextlib
import datetime as dt

import numpy as np
import pyarrow as pa
import torch

from mumic_core import checkpoint

from .decode import pixels_of
from .tables import FLOATS_TYPE, LABEL_TYPE, LABELS_TYPE, UTC_TS

OUTPUT_COLUMNS = ("labels", "scores", "embedding", "processed_at")


def select_labels(
    scores: np.ndarray, thresholds: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: labels at/above their threshold plus the top-k, best first.

    scores [B, C], thresholds [C] → (label index [M], score [M], count per row [B]) with rows concatenated.
    """
    order = np.argsort(-scores, axis=1, kind="stable")  # [B, C] best first
    ranked = np.take_along_axis(scores, order, axis=1)  # [B, C]
    keep = (ranked >= thresholds[order]) | (np.arange(scores.shape[1])[None, :] < top_k)  # [B, C]
    return order[keep], ranked[keep], keep.sum(axis=1)


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
        device: str = "auto",
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = checkpoint.load(model_uri, map_location=self.device)
        self.image_size = self.model.config.image_size
        self.top_k = int(top_k)
        self.thresholds = self.model.thresholds.float().cpu().numpy()  # [C]
        self.label_names = pa.array(self.model.taxonomy.names, pa.string())
        self.num_labels = len(self.label_names)
        self.embed_dim = self.model.embed_dim
        with torch.inference_mode():
            self.model.class_embeddings()  # build the cached [C, D] text side once, before the first batch

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, 3, H, W] → (scores [B, C] float32, embeddings [B, D] float32, L2-normalised)."""
        if len(pixels) == 0:
            return np.zeros((0, self.num_labels), np.float32), np.zeros((0, self.embed_dim), np.float32)
        with torch.inference_mode(), self._autocast():
            out = self.model(torch.from_numpy(np.ascontiguousarray(pixels)))
        scores = out["probs"].float().cpu().numpy()
        emb = torch.nn.functional.normalize(out["img_emb"].float(), dim=-1).cpu().numpy()
        return scores, emb

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok, pixels = pixels_of(batch, self.image_size)
        scores, emb = self.predict(pixels)  # [n_ok, C], [n_ok, D]
        n = batch.num_rows
        idx, sel_scores, counts = select_labels(scores, self.thresholds, self.top_k)
        row_counts = np.zeros(n, np.int64)
        row_counts[ok] = counts
        labels_values = pa.StructArray.from_arrays(
            [self.label_names.take(pa.array(idx, pa.int64())), pa.array(sel_scores, pa.float32())],
            fields=list(LABEL_TYPE),
        )
        labels = _list_array(labels_values, row_counts, ok, LABELS_TYPE)
        scores_col = _list_array(
            pa.array(scores.reshape(-1), pa.float32()), np.full(n, self.num_labels), ok, FLOATS_TYPE
        )
        emb_col = _list_array(
            pa.array(emb.reshape(-1), pa.float32()), np.full(n, self.embed_dim), ok, FLOATS_TYPE
        )
        now = pa.scalar(dt.datetime.now(dt.UTC), UTC_TS)
        processed_at = pa.nulls(n, UTC_TS).fill_null(now)
        out = batch.drop_columns([c for c in ("pixels", *OUTPUT_COLUMNS) if c in batch.column_names])
        for name, col in (
            ("labels", labels),
            ("scores", scores_col),
            ("embedding", emb_col),
            ("processed_at", processed_at),
        ):
            out = out.append_column(name, col)
        return out
