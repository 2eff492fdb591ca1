"""Annotated images as Ray Data, for training and evaluation: annotations → decoded uint8 pixels → (augmented) batches.

Decoding runs once, in Ray Data CPU tasks (`map_batches`), before the workers start; each split is
materialised in the object store (spilling to disk when large), so epochs re-read pixels instead of
re-fetching and re-decoding. Images that cannot be read are counted and skipped here: the run goes on.
Per epoch, only cheap numpy work runs as Ray Data tasks: dropping unreadable rows and augmentation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mumic_core import images

from .. import storage
from .augment import Augment, augment_batch, eval_batch, train_rows
from .table import Annotations

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 128


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    resize_mode: str = "shortest",
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    threads: int = 8,
) -> dict[str, np.ndarray]:
    """(image_id, uri, labels, mask, split) → adds `image` uint8 [B, 3, S, S] and `error` ('' when ok).

    The bytes come from `storage.read_many` (concurrent reads, the retag fetch stage's retries and
    reasons), the pixels from `images.load_many` (the retag decode stage's helper). An unreadable row
    keeps a zero image and a one-line reason; it is dropped before training.
    """
    read = storage.read_many([str(u) for u in batch["uri"]], threads=threads)
    packed, ok, decode_errors = images.load_many([data for data, _ in read], image_size, max_pixels, resize_mode)
    pixels = np.zeros((len(read), 3, image_size, image_size), dtype=np.uint8)
    pixels[ok] = packed
    errors = [
        "" if ok[i] else str(failure) if failure is not None else str(decode_errors[i])
        for i, (_, failure) in enumerate(read)
    ]
    return {**batch, "image": pixels, "error": np.array(errors, dtype=object)}


def to_dataset(ann: Annotations):
    """A Ray Dataset of (image_id, uri, labels [C], mask [C], split), in blocks of ROWS_PER_BLOCK rows."""
    import ray

    labels, mask = ann.label_matrix(), ann.known_mask()
    rows = [
        {"image_id": i, "uri": u, "labels": labels[k], "mask": mask[k], "split": s}
        for k, (i, u, s) in enumerate(
            zip(ann.frame["image_id"], ann.frame["uri"], ann.frame["split"], strict=True)
        )
    ]
    return ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / ROWS_PER_BLOCK)))


@dataclass
class DecodedSplits:
    """Materialised decoded splits plus what could not be read."""

    datasets: dict = field(default_factory=dict)  # split → materialised Dataset (unreadable rows included)
    counts: dict[str, int] = field(default_factory=dict)  # split → readable images
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "split", "error"]))
    _eval: dict = field(default_factory=dict, repr=False)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def merge(self, other: DecodedSplits) -> None:
        self.datasets.update(other.datasets)
        self.counts.update(other.counts)
        self.errors = (
            pd.concat([self.errors, other.errors], ignore_index=True) if other.n_errors else self.errors
        )

    def train(self, augment: Augment | None = None):
        """The per-epoch training stream. The readable rows' tensors are materialised once (and the decoded
        split released); only augmentation, when enabled, runs as Ray Data tasks every epoch."""
        if "train" not in self._eval:
            self._eval["train"] = (
                self.datasets["train"].map_batches(train_rows, batch_size=None).materialize()
            )
            self.datasets.pop("train")
        rows = self._eval["train"]
        if augment is None or not augment.enabled:
            return rows
        return rows.map_batches(augment_batch, fn_kwargs={"augment": augment}, batch_size=None)

    def eval(self, split: str):
        """A split's readable rows, materialised: iterating it every epoch launches no task."""
        if split not in self._eval:
            ds = self.datasets[split]
            if (self.errors["split"] == split).any():
                ds = ds.map_batches(eval_batch, batch_size=None).materialize()
            self._eval[split] = ds
        return self._eval[split]


def decode_splits(
    ann: Annotations,
    image_size: int,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
    resize_mode: str = "shortest",
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
) -> DecodedSplits:
    """Fetch + decode every split once (Ray Data tasks), materialise, and count the unreadable images."""
    out = DecodedSplits()
    errors = []
    for split in splits:
        part = ann.split(split)
        if len(part) == 0:
            continue
        ds = (
            to_dataset(part)
            .map_batches(
                decode_batch,
                fn_kwargs={"image_size": image_size, "resize_mode": resize_mode, "max_pixels": max_pixels},
                batch_size=batch_size,
            )
            .materialize()
        )
        status = ds.select_columns(["image_id", "error"]).to_pandas()
        bad = status[status["error"] != ""].assign(split=split)
        errors.append(bad[["image_id", "split", "error"]])
        out.datasets[split] = ds
        out.counts[split] = int(len(status) - len(bad))
    out.errors = pd.concat(errors, ignore_index=True) if errors else out.errors
    if out.n_errors:
        log.warning(
            "%d of %d images could not be read and are skipped, e.g. %s: %s",
            out.n_errors,
            out.n_errors + sum(out.counts.values()),
            out.errors["image_id"].iloc[0],
            out.errors["error"].iloc[0],
        )
    return out
