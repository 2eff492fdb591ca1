"""One side's counts: per label, the rows whose taxonomy has it, those at or above its threshold and the
sum of its scores; per model version, the rows and the sum of their embeddings. Streams the side's
batches, so memory stays flat whatever the catalog size."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .sides import DriftError
from .thresholds import Model, Thresholds

KEYS = ["run_id", "model_name", "model_version"]


@dataclass
class LabelCounts:
    images: int = 0
    above: int = 0
    score_sum: float = 0.0
    sources: set[str] = field(default_factory=set)  # `model` / `fallback`: where its thresholds came from


@dataclass
class Tally:
    labels: dict[str, LabelCounts] = field(default_factory=dict)  # in the order first seen
    rows: int = 0
    models: Counter = field(default_factory=Counter)  # Model → rows
    embedding_sum: dict[Model, np.ndarray] = field(default_factory=dict)  # float64 [D]
    embedded: Counter = field(default_factory=Counter)  # Model → rows with an embedding

    def add(self, batch: pa.RecordBatch, taxonomies: dict[str, tuple[str, ...]], thresholds: Thresholds) -> None:
        """Count a batch of rows (any mix of runs and models)."""
        for (run_id, name, version), rows in _groups(batch):
            names = taxonomies.get(run_id)
            if names is None:
                raise DriftError(f"rows of run {run_id} have no `runs` row, so their scores have no label names")
            model = (name, version)
            scores = _matrix(rows.column("scores"), len(names), f"the scores of run {run_id}")  # [n, C]
            cut, own = thresholds.vector(model, names)
            above = (scores >= cut[None, :]).sum(axis=0)
            sums = scores.sum(axis=0, dtype=np.float64)
            for i, label in enumerate(names):
                counts = self.labels.setdefault(label, LabelCounts())
                counts.images += rows.num_rows
                counts.above += int(above[i])
                counts.score_sum += float(sums[i])
                counts.sources.add("model" if own[i] else "fallback")
            self.rows += rows.num_rows
            self.models[model] += rows.num_rows
            self._add_embeddings(model, rows.column("embedding"))

    def _add_embeddings(self, model: Model, column: pa.Array) -> None:
        column = column.filter(pc.is_valid(column))
        if not len(column):
            return
        dim = len(column[0].values)
        emb = _matrix(column, dim, f"the embeddings of {model[0]}/{model[1]}")  # [n, D]
        if model in self.embedding_sum and self.embedding_sum[model].shape[0] != dim:
            raise DriftError(f"the embeddings of {model[0]}/{model[1]} do not all have the same length")
        self.embedding_sum[model] = self.embedding_sum.get(model, 0.0) + emb.sum(axis=0, dtype=np.float64)
        self.embedded[model] += len(column)

    def centroid(self, model: Model) -> np.ndarray | None:
        """The mean embedding of this side's rows embedded by `model` [D], or None when it has none."""
        if not self.embedded[model]:
            return None
        return self.embedding_sum[model] / self.embedded[model]


def taxonomies(runs: dict[str, dict]) -> dict[str, tuple[str, ...]]:
    """Each committed run's label names, in the order of its `scores`."""
    return {run_id: tuple(json.loads(r["taxonomy"])) for run_id, r in runs.items()}


def _groups(batch: pa.RecordBatch):
    """(run_id, model_name, model_version) → the batch's rows with those values."""
    keys = pa.Table.from_batches([batch.select(KEYS)])
    distinct = keys.group_by(KEYS).aggregate([]).to_pylist()
    if len(distinct) == 1:
        yield tuple(distinct[0][k] for k in KEYS), batch
        return
    for key in distinct:
        mask = pc.and_kleene(
            pc.and_kleene(pc.equal(batch.column("run_id"), key["run_id"]), pc.equal(batch.column("model_name"), key["model_name"])),
            pc.equal(batch.column("model_version"), key["model_version"]),
        )
        yield tuple(key[k] for k in KEYS), batch.filter(mask)


def _matrix(column: pa.Array, width: int, what: str) -> np.ndarray:
    """A list<float> column whose lists all have `width` values → [n, width] float32."""
    lengths = pc.list_value_length(column)
    if len(column) and (pc.min(lengths).as_py() != width or pc.max(lengths).as_py() != width):
        raise DriftError(f"{what} do not all have {width} values: the table does not match its runs rows")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), width)
