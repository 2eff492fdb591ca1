"""The test per label and the centroid shift.

Per label: rate = share of rows at or above the label's threshold, on each side; a two-proportion z-test
(pooled) of the change; Benjamini-Hochberg across the comparison's labels (scipy); a label is flagged when
its adjusted p (q) < alpha AND |change| >= min_change, so a huge catalog does not flag trivial changes.
A label in only one side's taxonomy is reported with nulls and never flagged. The test treats the two
sides as independent samples; in scope `current` they share most images, which makes it conservative.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from .tally import Tally
from .thresholds import Model


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p of the pooled two-proportion z-test (k of n above, each side)."""
    pooled = (k1 + k2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:  # both sides all above or all below: the rates cannot differ
        return 1.0
    z = (k2 / n2 - k1 / n1) / math.sqrt(variance)
    return float(2 * sps.norm.sf(abs(z)))


def label_rows(a: Tally, b: Tally, alpha: float, min_change: float) -> list[dict]:
    """One dict per label of either side (the `to` side's order, then labels only `from` has)."""
    names = [*b.labels, *(n for n in a.labels if n not in b.labels)]
    rows = []
    for name in names:
        fa, fb = a.labels.get(name), b.labels.get(name)
        row = {"label": name, **_side("from", fa), **_side("to", fb), "change": None, "p_value": None}
        if row["rate_from"] is not None and row["rate_to"] is not None:
            row["change"] = row["rate_to"] - row["rate_from"]
            row["p_value"] = two_proportion_p(fa.above, fa.images, fb.above, fb.images)
        sources = (fa.sources if fa else set()) | (fb.sources if fb else set())
        row["threshold_source"] = "+".join(sorted(sources, key=["model", "fallback"].index)) or None
        rows.append(row)
    tested = [r for r in rows if r["p_value"] is not None]
    q = sps.false_discovery_control([r["p_value"] for r in tested], method="bh") if tested else []
    for r, qv in zip(tested, q, strict=True):
        r["q_value"] = float(qv)
    for r in rows:
        r.setdefault("q_value", None)
        r["flagged"] = bool(r["q_value"] is not None and r["q_value"] < alpha and abs(r["change"]) >= min_change)
    return rows


def _side(which: str, counts) -> dict:
    if counts is None or not counts.images:
        return {f"images_{which}": None if counts is None else 0, f"above_{which}": None if counts is None else 0,
                f"rate_{which}": None, f"mean_score_{which}": None}
    return {
        f"images_{which}": counts.images,
        f"above_{which}": counts.above,
        f"rate_{which}": counts.above / counts.images,
        f"mean_score_{which}": counts.score_sum / counts.images,
    }


def centroid_shift(a: Tally, b: Tally, model: Model) -> tuple[float | None, str]:
    """Cosine distance between the sides' mean embeddings, over the rows `model` embedded (embeddings of
    different models do not compare); None, and why, when a side has none."""
    ca, cb = a.centroid(model), b.centroid(model)
    who = f"{model[0]}/{model[1]}"
    if ca is None or cb is None:
        side = "from" if ca is None else "to"
        return None, f"no centroid shift: the {side} side has no rows embedded by {who} (the model changed)"
    if ca.shape != cb.shape:
        return None, f"no centroid shift: the embeddings of {who} differ in length between the sides"
    norm = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    shift = 1.0 - float(ca @ cb) / norm if norm > 0 else None
    note = f"over the {a.embedded[model]} and {b.embedded[model]} rows embedded by {who}"
    if a.embedded[model] < a.rows or b.embedded[model] < b.rows:
        note += " (other rows are of other models)"
    return shift, note
