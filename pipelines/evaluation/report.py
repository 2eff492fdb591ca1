"""The metrics of one split (`mumic_core.metrics`, the one implementation) as a `Report`, plus the label-prior
baseline, ZSL/GZSL when there are unseen labels, and the most confused label pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mumic_core import metrics
from mumic_core.metrics import HEADLINE
from mumic_core.taxonomy import Taxonomy

from .scoring import Scored

# What a report prints beside HEADLINE when the split has unseen positives (methods.md §4): ZSL ranks the
# unseen labels over the images that have one, GZSL every label over every image.
OPEN_VOCABULARY = tuple(f"{p}_{k}" for p in ("zsl", "gzsl") for k in ("map", "f1_at_3", "f1_at_5"))


@dataclass
class Report:
    """Metrics of one split: `metrics` holds floats (map, gap, gap_at_10, f1_at_3, f1_at_5, ..., zsl_*,
    gzsl_*, baseline_*); `per_class_ap` maps label → AP (NaN without positives)."""

    split: str
    metrics: dict[str, float] = field(default_factory=dict)
    per_class_ap: dict[str, float] = field(default_factory=dict)
    n_positives: dict[str, int] = field(default_factory=dict)

    def headline(self) -> str:
        parts = [f"{k} {self.metrics.get(k, math.nan):.4f}" for k in HEADLINE]
        parts += [f"{k} {self.metrics[k]:.4f}" for k in OPEN_VOCABULARY if k in self.metrics]
        return f"{self.split}: " + "  ".join(parts) + f"  ({int(self.metrics.get('n_images', 0))} images)"


def report(
    scored: Scored,
    taxonomy: Taxonomy,
    split: str,
    train_labels: np.ndarray | None = None,
    train_mask: np.ndarray | None = None,
) -> Report:
    """evaluate_all (+ ZSL/GZSL when the taxonomy has unseen labels with known positives here, + the
    label-prior baseline when training labels are given)."""
    full = metrics.evaluate_all(scored.scores, scored.labels, class_names=taxonomy.names, mask=scored.mask)
    per_class = full.pop("per_class_ap")
    out = {k: float(v) for k, v in full.items()}
    unseen = np.asarray(taxonomy.unseen_mask, dtype=bool)
    known_pos = scored.labels * scored.mask
    if unseen.any() and known_pos[:, unseen].any():
        zsl = metrics.zsl_gzsl(scored.scores, scored.labels, unseen, mask=scored.mask)
        out.update({k: float(v) for k, v in zsl.items()})
    if train_labels is not None:
        prior = metrics.label_prior_scores(train_labels, len(scored.scores), mask=train_mask)
        base = metrics.evaluate_all(prior, scored.labels, class_names=taxonomy.names, mask=scored.mask)
        out.update({f"baseline_{k}": float(base[k]) for k in HEADLINE})
    positives = dict(zip(taxonomy.names, (int(v) for v in known_pos.sum(axis=0)), strict=True))
    return Report(
        split=split,
        metrics=out,
        per_class_ap={k: float(v) for k, v in per_class.items()},
        n_positives=positives,
    )


def confused_pairs(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    thresholds: np.ndarray,
    names: Sequence[str],
    top: int = 20,
) -> pd.DataFrame:
    """Ordered label pairs (true, predicted): images where `true` is a positive, `predicted` is a known
    negative, yet `predicted` scores at or above its threshold. Most frequent first, with the rate over
    the positives of `true`."""
    pred = (scores >= thresholds[None, :]) & (mask > 0)  # [N, C]
    pos = (labels > 0) & (mask > 0)  # [N, C]
    false_pos = pred & ~pos  # [N, C]
    counts = pos.T.astype(np.int64) @ false_pos.astype(np.int64)  # [C_true, C_pred]
    np.fill_diagonal(counts, 0)
    n_pos = pos.sum(axis=0)
    rows = []
    for t, p in zip(*np.nonzero(counts), strict=True):
        rows.append(
            {
                "true_label": names[t],
                "predicted_label": names[p],
                "count": int(counts[t, p]),
                "rate": float(counts[t, p] / max(n_pos[t], 1)),
            }
        )
    frame = pd.DataFrame(rows, columns=["true_label", "predicted_label", "count", "rate"])
    return frame.sort_values(["count", "rate"], ascending=False).head(top).reset_index(drop=True)
