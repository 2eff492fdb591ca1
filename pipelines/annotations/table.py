"""Annotations (what a model learns from): read, resolve, validate and split them before any training.

A Parquet or CSV file, local or s3:// (contract.md, Inputs): `image_id`, `uri`, `labels` (a list in
Parquet, a '|'-separated string in CSV), optional `split` (train/val/test; a deterministic hash of the
id when absent or empty) and optional `unknown_labels` (truth unknown: masked out of loss and metrics).
Every defect a user can cause is found here and reported in one line, naming all offenders (values quoted
from the file are cut short, so a hostile file cannot make a huge message).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa

from mumic_core.splits import SPLITS, split_of
from mumic_core.taxonomy import Taxonomy

from .. import storage
from ..storage.files import first_longer

log = logging.getLogger(__name__)

LABEL_SEPARATOR = "|"
REQUIRED_COLUMNS = ("image_id", "uri", "labels")
MAX_FIELD_CHARS = 8_192  # an image_id, uri or split: S3 keys are at most 1024 bytes, local paths 4096
MAX_LABELS_CHARS = 1 << 20  # a CSV labels / unknown_labels cell: '|'-separated names


class AnnotationError(ValueError):
    """A user-fixable defect in an annotations file (one line, names every offender)."""


@dataclass(frozen=True)
class Annotations:
    """Validated annotations: one row per image, uris absolute, labels as lists of taxonomy names.

    `frame` columns: image_id, uri, labels (list[str]), unknown_labels (list[str]), split.
    With `unseen_dropped`, labels marked `unseen` in the taxonomy were removed and their columns are
    masked out (methods.md §4: training never sees them, neither as positives nor as negatives).
    """

    frame: pd.DataFrame
    taxonomy: Taxonomy
    source: str
    unseen_dropped: bool = False

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def split_counts(self) -> dict[str, int]:
        counts = self.frame["split"].value_counts()
        return {s: int(counts.get(s, 0)) for s in SPLITS}

    def split(self, name: str) -> Annotations:
        if name in ("all", "*"):
            return self
        if name not in SPLITS:
            raise AnnotationError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)} or 'all'")
        return replace(self, frame=self.frame[self.frame["split"] == name].reset_index(drop=True))

    def without(self, image_ids: Iterable[str]) -> Annotations:
        drop = set(image_ids)
        return replace(self, frame=self.frame[~self.frame["image_id"].isin(drop)].reset_index(drop=True))

    def label_matrix(self) -> np.ndarray:
        """Multi-hot [N, C] uint8 in taxonomy order."""
        return self.taxonomy.encode_labels(self.frame["labels"], strict=True)

    def known_mask(self) -> np.ndarray:
        """[N, C] uint8: 1 where the label's truth is known, 0 for unknown_labels and dropped unseen labels."""
        mask = 1 - self.taxonomy.encode_labels(self.frame["unknown_labels"], strict=True)
        if self.unseen_dropped:
            mask[:, np.asarray(self.taxonomy.unseen_mask, dtype=bool)] = 0
        return mask.astype(np.uint8)


def load(
    uri: str,
    taxonomy: Taxonomy,
    *,
    drop_unseen: bool = True,
    require: Sequence[str] = ("train", "val"),
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> Annotations:
    """Read and validate an annotations file; raises AnnotationError (or StorageError) in one line.

    `require` names the splits that must not be empty (training needs train and val).
    """
    source = storage.normalize(uri)
    table = storage.read_table(source)
    frame = _frame_from_table(table, source)
    base_dir = storage.parent(source)
    try:
        frame["uri"] = [storage.resolve(u, base_dir) for u in frame["uri"]]
    except storage.StorageError as e:
        raise AnnotationError(f"{source}: {e}") from None
    frame["split"] = _splits(frame, source, val_fraction, test_fraction)
    _check_labels(frame, taxonomy, source)
    ann = Annotations(frame=frame, taxonomy=taxonomy, source=source)
    if drop_unseen and any(taxonomy.unseen_mask):
        unseen = {lb.name for lb in taxonomy.labels if lb.unseen}
        frame = frame.copy()
        frame["labels"] = [[n for n in names if n not in unseen] for names in frame["labels"]]
        frame["unknown_labels"] = [[n for n in names if n not in unseen] for names in frame["unknown_labels"]]
        ann = Annotations(frame=frame, taxonomy=taxonomy, source=source, unseen_dropped=True)
    counts = ann.split_counts
    empty = [s for s in require if counts.get(s, 0) == 0]
    if empty:
        shown = ", ".join(f"{s}={n}" for s, n in counts.items())
        raise AnnotationError(f"{source}: split {' and '.join(repr(s) for s in empty)} is empty ({shown})")
    log.info("annotations %s: %d images (%s)", source, len(frame), counts)
    return ann


def _frame_from_table(table: pa.Table, source: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise AnnotationError(
            f"{source}: missing column(s) {', '.join(missing)} (have: {_names(table.column_names)})"
        )
    n = table.num_rows
    if n == 0:
        raise AnnotationError(f"{source}: no rows")
    _check_lengths(table, source)
    ids = [None if v is None else str(v).strip() for v in table.column("image_id").to_pylist()]
    uris = [None if v is None else str(v).strip() for v in table.column("uri").to_pylist()]
    bad_ids = [i for i, v in enumerate(ids) if not v]
    if bad_ids:
        raise AnnotationError(
            f"{source}: {len(bad_ids)} rows have an empty image_id (first at row {bad_ids[0]})"
        )
    bad_uris = [ids[i] for i, v in enumerate(uris) if not v]
    if bad_uris:
        raise AnnotationError(
            f"{source}: {len(bad_uris)} rows have an empty uri, e.g. image_id {_short(bad_uris[0])}"
        )
    dup = pd.Series(ids)
    dup = dup[dup.duplicated(keep="first")].unique().tolist()
    if dup:
        shown = ", ".join(_short(d) for d in dup[:10]) + (
            f" and {len(dup) - 10} more" if len(dup) > 10 else ""
        )
        raise AnnotationError(f"{source}: {len(dup)} duplicate image_id values: {shown}")
    frame = pd.DataFrame({"image_id": ids, "uri": uris})
    frame["labels"] = _label_lists(table.column("labels").to_pylist())
    if "unknown_labels" in table.column_names:
        frame["unknown_labels"] = _label_lists(table.column("unknown_labels").to_pylist())
    else:
        frame["unknown_labels"] = [[] for _ in range(n)]
    frame["split"] = table.column("split").to_pylist() if "split" in table.column_names else [None] * n
    return frame


def _check_lengths(table: pa.Table, source: str) -> None:
    """No text value of a column we use is absurdly long (a 10 MB uri is a broken export, not a path)."""
    for name in (*REQUIRED_COLUMNS, "split", "unknown_labels"):
        if name not in table.column_names or not pa.types.is_string(table.schema.field(name).type):
            continue
        limit = MAX_LABELS_CHARS if name in ("labels", "unknown_labels") else MAX_FIELD_CHARS
        long = first_longer(table.column(name), limit)
        if long is not None:
            raise AnnotationError(f"{source}: data row {long[0] + 1}: {name} is {long[1]} characters long (at most {limit})")


def _names(columns: list[str], at_most: int = 20) -> str:
    shown = [repr(str(c)[:40])[1:-1] for c in columns[:at_most]]
    return ", ".join(shown) + (f" and {len(columns) - at_most} more" if len(columns) > at_most else "")


def _short(value, limit: int = 60) -> str:
    """A value from the file, quoted for a message and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _label_lists(values: list) -> list[list[str]]:
    """Parquet lists, '|'-separated strings (CSV) or nulls → lists of stripped, non-empty names."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            names: list = []
        elif isinstance(v, str):
            names = v.split(LABEL_SEPARATOR)
        else:
            names = list(v)
        out.append(list(dict.fromkeys(str(n).strip() for n in names if n is not None and str(n).strip())))
    return out


def _splits(frame: pd.DataFrame, source: str, val_fraction: float, test_fraction: float) -> list[str]:
    out, bad = [], set()
    for image_id, value in zip(frame["image_id"], frame["split"], strict=True):
        value = "" if value is None else str(value).strip().lower()
        if not value:
            out.append(split_of(image_id, val_fraction, test_fraction))
        elif value in SPLITS:
            out.append(value)
        else:
            bad.add(value)
            out.append(value)
    if bad:
        raise AnnotationError(
            f"{source}: unknown split value(s) {', '.join(_short(b) for b in sorted(bad)[:10])}; "
            f"expected {', '.join(SPLITS)} (or empty for a hash split)"
        )
    return out


def _check_labels(frame: pd.DataFrame, taxonomy: Taxonomy, source: str) -> None:
    unknown: dict[str, int] = {}
    first_row: dict[str, str] = {}
    conflicts = []
    for image_id, labels, unk in zip(
        frame["image_id"], frame["labels"], frame["unknown_labels"], strict=True
    ):
        for name in (*labels, *unk):
            if name not in taxonomy:
                unknown[name] = unknown.get(name, 0) + 1
                first_row.setdefault(name, image_id)
        both = set(labels) & set(unk)
        if both:
            conflicts.append((image_id, sorted(both)[0]))
    if unknown:
        names = sorted(unknown, key=lambda n: (-unknown[n], n))
        listed = ", ".join(_short(n) for n in names[:20]) + (
            f" and {len(names) - 20} more" if len(names) > 20 else ""
        )
        example = f"e.g. {_short(names[0])} in image_id {_short(first_row[names[0]])}"
        raise AnnotationError(
            f"{source}: {len(names)} label(s) not in the taxonomy: {listed} ({example}); "
            "add them to the taxonomy or fix the annotations"
        )
    if conflicts:
        image_id, name = conflicts[0]
        raise AnnotationError(
            f"{source}: {len(conflicts)} rows list a label both in labels and unknown_labels, "
            f"e.g. {_short(name)} in image_id {_short(image_id)}"
        )
