"""Multi-label ranking and threshold metrics (AP, mAP, GAP@k, F1@k, ZSL/GZSL), pure numpy.

The one implementation used by training, `mumic evaluate`, benchmarks and reports (methods.md §4).
"""

from __future__ import annotations

import math

import numpy as np

# Score entries per block of classes ranked together: bounds the temporaries of a large evaluation
# (e.g. 50k images x 1k classes) to a few hundred MB instead of several GB.
_BLOCK_ELEMENTS = 1 << 22

# The headline metrics, in the order every report prints them; also what may select a checkpoint.
HEADLINE = ("map", "gap", "gap_at_10", "f1_at_3", "f1_at_5")

__all__ = [
    "HEADLINE",
    "average_precision",
    "evaluate_all",
    "f1_at_k",
    "global_average_precision",
    "label_prior_scores",
    "map_report",
    "mean_average_precision",
    "pr_curve",
    "precision_recall_at_k",
    "threshold_metrics",
    "tune_thresholds",
    "zsl_gzsl",
]


# ----------------------------------------------------------------------------- validation


def _check(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (scores float64 [N, C], labels float64 [N, C], known float64 [N, C]) or raises ValueError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.ndim != 2:
        raise ValueError(
            f"scores and labels must be 2-D [N, C]; got shapes {scores.shape} and {labels.shape}"
        )
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} does not match labels shape {labels.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if labels.dtype != bool and not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be 0/1")
    labels = labels.astype(np.float64)
    if mask is None:
        known = np.ones_like(labels)
    else:
        mask = np.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
        if mask.dtype != bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be 0/1 (1 = label known)")
        known = mask.astype(np.float64)
    # Unknown entries never count as positives, whatever the caller put in labels there.
    return scores, labels * known, known


def _check_k(k: int, n_classes: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return min(int(k), n_classes)


# ----------------------------------------------------------------------------- ranking core


def _sort_rows_desc(scores: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sorts each row of [C, N] `scores` descending and reorders `others` alike.

    Class-major rows keep every sort, gather and cumsum on numpy's fast contiguous last axis.
    Callers treat tie groups as a whole, so an unstable (faster) sort gives the same results.
    """
    order = np.argsort(-scores, axis=1)
    return tuple(np.take_along_axis(a, order, axis=1) for a in (scores, *others))


def _is_group_end(s: np.ndarray) -> np.ndarray:
    """[C, N] True where a row of descending scores has its last item of a tie group."""
    is_end = np.ones(s.shape, dtype=bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    return is_end


def _tied_precision_sums(
    scores: np.ndarray, rel: np.ndarray, known: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_{relevant i} precision(i) and the number of relevant items, per row of [C, N] inputs.

    Tied scores form one threshold, as in sklearn: every item of a tie group gets the precision
    measured at the end of the group, so the result does not depend on the order among ties.
    Unknown items (known = 0) add nothing to either count, so their position does not matter.
    """
    c, n = scores.shape
    if n == 0:
        return np.zeros(c), np.zeros(c)
    if known is None:
        s, y = _sort_rows_desc(scores, rel)
    else:
        s, y, seen = _sort_rows_desc(scores, rel, known)
        cum_seen = np.cumsum(seen, axis=1)
    cum_tp = np.cumsum(y, axis=1)
    end_idx = np.where(_is_group_end(s), np.arange(n), n)
    group_end = np.minimum.accumulate(end_idx[:, ::-1], axis=1)[:, ::-1]

    rows, cols = np.nonzero(y)  # precision is only needed where an item is relevant
    ends = group_end[rows, cols]
    n_seen = ends + 1.0 if known is None else cum_seen[rows, ends]
    precision = cum_tp[rows, ends] / n_seen
    return np.bincount(rows, weights=precision, minlength=c).astype(np.float64), cum_tp[:, -1]


def _class_blocks(n_rows: int, n_cols: int):
    step = max(1, _BLOCK_ELEMENTS // max(n_rows, 1))
    for start in range(0, n_cols, step):
        yield slice(start, min(start + step, n_cols))


def _top_k_pool(
    scores: np.ndarray, rel: np.ndarray, known: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """1-D (scores, rel) of every image's k best known predictions, pooled (in no particular order)."""
    if k < scores.shape[1]:
        # argpartition is O(C) per row; which of several tied scores at the k-th place is kept is
        # arbitrary but deterministic, and only matters for exactly tied scores.
        ranked = np.where(known > 0, scores, -np.inf)
        top = np.argpartition(-ranked, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, top, axis=1)
        rel = np.take_along_axis(rel, top, axis=1)
        known = np.take_along_axis(known, top, axis=1)
    keep = known > 0
    return scores[keep], rel[keep]


# ----------------------------------------------------------------------------- AP / mAP


def average_precision(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-class non-interpolated AP [C]; NaN for a class with no (known) positives.

    Equals `sklearn.metrics.average_precision_score` per column, ties included. `mask` [N, C]
    marks known entries; an unknown entry (0) is left out of that class's ranking.
    """
    scores, rel, known = _check(scores, labels, mask)
    n, c = scores.shape
    ap = np.full(c, np.nan)
    for cols in _class_blocks(n, c):
        sums, n_pos = _tied_precision_sums(
            scores[:, cols].T, rel[:, cols].T, None if mask is None else known[:, cols].T
        )
        ap[cols] = np.divide(sums, n_pos, out=np.full_like(sums, np.nan), where=n_pos > 0)
    return ap


def _select_classes(labels: np.ndarray, known: np.ndarray, top_k_classes: int | None) -> np.ndarray:
    n_pos = (labels * known).sum(axis=0)
    if top_k_classes is None:
        return np.arange(labels.shape[1])
    k = _check_k(top_k_classes, labels.shape[1])
    return np.argsort(-n_pos, kind="stable")[:k]


def map_report(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    empty: str = "exclude",
    top_k_classes: int | None = None,
) -> dict:
    """Macro mAP with its bookkeeping: {"map", "n_classes_averaged", "n_classes_excluded"}.

    empty="exclude" drops classes with no positives (reported in n_classes_excluded);
    empty="zero" counts them as AP 0 (the MKT / ML-Decoder convention, nothing excluded).
    top_k_classes=K restricts to the K classes with the most positives (ties: lower index first).
    """
    scores, labels_, known = _check(scores, labels, mask)
    classes = _select_classes(labels_, known, top_k_classes)
    return _summarise_ap(average_precision(scores[:, classes], labels_[:, classes], known[:, classes]), empty)


def _summarise_ap(ap: np.ndarray, empty: str) -> dict:
    if empty not in ("exclude", "zero"):
        raise ValueError(f"empty must be 'exclude' or 'zero', got {empty!r}")
    is_empty = np.isnan(ap)
    if empty == "zero":
        ap = np.where(is_empty, 0.0, ap)
        n_excluded = 0
    else:
        ap = ap[~is_empty]
        n_excluded = int(is_empty.sum())
    return {
        "map": float(ap.mean()) if ap.size else math.nan,
        "n_classes_averaged": int(ap.size),
        "n_classes_excluded": n_excluded,
    }


def mean_average_precision(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, **options
) -> float:
    """Macro mAP over classes; NaN when no class qualifies. `options` (empty, top_k_classes) as in
    `map_report`."""
    return map_report(scores, labels, mask=mask, **options)["map"]


# ----------------------------------------------------------------------------- GAP@k, F1@k


def global_average_precision(
    scores: np.ndarray, labels: np.ndarray, k: int | None = None, mask: np.ndarray | None = None
) -> float:
    """YouTube-8M GAP@k: pool each image's top-k (class, score) pairs, rank them all by score.

    GAP@k = Σ_i P(i)·rel(i) / M with M = all known positive labels of the set, so an image with more
    than k labels caps GAP@k below 1. k=None (or k >= C) keeps every prediction. NaN if M = 0.
    """
    scores, rel, known = _check(scores, labels, mask)
    n, c = scores.shape
    n_total_pos = rel.sum()
    if n == 0 or c == 0 or n_total_pos == 0:
        return math.nan
    k = c if k is None else _check_k(k, c)
    pooled_scores, pooled_rel = _top_k_pool(scores, rel, known, k)
    sums, _ = _tied_precision_sums(pooled_scores[None, :], pooled_rel[None, :], None)
    return float(sums[0] / n_total_pos)


def precision_recall_at_k(
    scores: np.ndarray, labels: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[float, float]:
    """Overall (micro) precision@k and recall@k: each image's top-k known classes are predicted positive."""
    scores, rel, known = _check(scores, labels, mask)
    n, c = scores.shape
    if n == 0 or c == 0:
        return math.nan, math.nan
    _, pooled_rel = _top_k_pool(scores, rel, known, _check_k(k, c))
    tp = pooled_rel.sum()
    n_predicted = pooled_rel.size
    n_pos = rel.sum()
    precision = tp / n_predicted if n_predicted > 0 else math.nan
    recall = tp / n_pos if n_pos > 0 else math.nan
    return float(precision), float(recall)


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return math.nan
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def f1_at_k(
    scores: np.ndarray, labels: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Overall (micro) (F1@k, P@k, R@k); TP, FP and FN are pooled over the whole set."""
    precision, recall = precision_recall_at_k(scores, labels, k, mask=mask)
    return _f1(precision, recall), precision, recall


# ----------------------------------------------------------------------------- thresholds


def threshold_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: float | np.ndarray,
    mask: np.ndarray | None = None,
) -> dict:
    """Precision, recall and F1 when `score >= threshold` is predicted positive.

    `thresholds` is a scalar or one value per class [C]. Returns micro "precision", "recall", "f1",
    "macro_f1" (mean over classes with positives) and per-class arrays "per_class_precision",
    "per_class_recall", "per_class_f1". Per class: precision is 0 with no predictions (sklearn's
    zero_division); recall and F1 are NaN for a class with no positives.
    """
    scores, rel, known = _check(scores, labels, mask)
    c = scores.shape[1]
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(c, float(thr))
    if thr.shape != (c,):
        raise ValueError(f"thresholds must be a scalar or shape ({c},), got shape {thr.shape}")

    pred = (scores >= thr[None, :]) & (known > 0)
    tp = (pred * rel).sum(axis=0)
    n_pred = pred.sum(axis=0).astype(np.float64)
    n_pos = rel.sum(axis=0)

    precision_c = np.divide(tp, n_pred, out=np.zeros(c), where=n_pred > 0)
    recall_c = np.divide(tp, n_pos, out=np.full(c, np.nan), where=n_pos > 0)
    denom = precision_c + recall_c
    f1_c = np.divide(2 * precision_c * recall_c, denom, out=np.zeros(c), where=denom > 0)
    f1_c[n_pos == 0] = np.nan

    tp_all, pred_all, pos_all = tp.sum(), n_pred.sum(), n_pos.sum()
    precision = float(tp_all / pred_all) if pred_all > 0 else 0.0
    recall = float(tp_all / pos_all) if pos_all > 0 else math.nan
    has_pos = n_pos > 0
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "macro_f1": float(f1_c[has_pos].mean()) if has_pos.any() else math.nan,
        "per_class_precision": precision_c,
        "per_class_recall": recall_c,
        "per_class_f1": f1_c,
    }


def _beta(metric: str) -> float:
    # "f1", "f2", "f0.5": F-beta; anything else is a caller's typo worth failing on.
    if metric.startswith("f"):
        try:
            beta = float(metric[1:])
        except ValueError:
            beta = -1.0
        if beta > 0:
            return beta
    raise ValueError(f"metric must be 'f1' or another F-beta like 'f2', 'f0.5'; got {metric!r}")


def tune_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    metric: str = "f1",
    default: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-class decision thresholds [C] maximising F1 (or F-beta) on validation data.

    The threshold sits midway between the best cut's lowest accepted score and the next lower score,
    so a cut that separates the validation data keeps a margin on both sides. On ties in F1 the
    highest threshold wins (fewer predictions). Classes without positives get `default`.
    """
    beta2 = _beta(metric) ** 2
    scores, rel, known = _check(scores, labels, mask)
    n, c = scores.shape
    thresholds = np.full(c, float(default))
    if n == 0:
        return thresholds
    # Unknown entries sink to the bottom and add nothing to the counts.
    ranked = np.where(known > 0, scores, -np.inf)
    for cols in _class_blocks(n, c):
        thresholds[cols] = _best_cuts(ranked[:, cols].T, rel[:, cols].T, known[:, cols].T, beta2, default)
    return thresholds


def _best_cuts(
    ranked: np.ndarray, rel: np.ndarray, known: np.ndarray, beta2: float, default: float
) -> np.ndarray:
    """tune_thresholds for [C, N] class-major rows; `ranked` has unknown entries at -inf."""
    c, n = ranked.shape
    s, y, seen = _sort_rows_desc(ranked, rel, known)
    cum_tp = np.cumsum(y, axis=1)
    cum_pred = np.cumsum(seen, axis=1)
    n_pos = cum_tp[:, -1:]
    precision = np.divide(cum_tp, cum_pred, out=np.zeros_like(cum_tp), where=cum_pred > 0)
    recall = np.divide(cum_tp, n_pos, out=np.zeros_like(cum_tp), where=n_pos > 0)
    denom = beta2 * precision + recall
    fbeta = np.divide((1 + beta2) * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    # Only the end of a tie group is a cut a threshold can make.
    fbeta = np.where(_is_group_end(s) & np.isfinite(s), fbeta, -1.0)
    # argmax takes the first maximum: the highest threshold among equally good cuts.
    best = np.argmax(fbeta, axis=1)

    rows = np.arange(c)
    lowest_accepted = s[rows, best]
    next_lower = np.where(best + 1 < n, s[rows, np.minimum(best + 1, n - 1)], -np.inf)
    midpoint = np.where(np.isfinite(next_lower), (lowest_accepted + next_lower) / 2, lowest_accepted)
    return np.where(n_pos[:, 0] > 0, midpoint, default)


def pr_curve(
    scores_c: np.ndarray, labels_c: np.ndarray, mask_c: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's (precision, recall, thresholds), one point per distinct score, highest threshold first.

    Point i predicts `score >= thresholds[i]` positive. Recall is NaN throughout with no positives.
    """
    scores_c = np.asarray(scores_c, dtype=np.float64)
    labels_c = np.asarray(labels_c)
    if scores_c.ndim != 1 or scores_c.shape != labels_c.shape:
        raise ValueError(
            f"pr_curve takes one class: 1-D scores and labels of equal length, "
            f"got shapes {scores_c.shape} and {labels_c.shape}"
        )
    mask2 = None if mask_c is None else np.asarray(mask_c)[:, None]
    scores2, rel2, known2 = _check(scores_c[:, None], labels_c[:, None], mask2)
    keep = known2[:, 0] > 0
    s, y = scores2[keep, 0], rel2[keep, 0]
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    if s.size == 0:
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    is_end = np.ones(s.size, dtype=bool)
    is_end[:-1] = s[1:] != s[:-1]
    tp = np.cumsum(y)[is_end]
    n_pred = np.arange(1, s.size + 1, dtype=np.float64)[is_end]
    n_pos = y.sum()
    recall = tp / n_pos if n_pos > 0 else np.full(tp.shape, np.nan)
    return tp / n_pred, recall, s[is_end]


# ----------------------------------------------------------------------------- reports


def _ranking_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    ks: tuple[int, ...],
    gap_ks: tuple[int, ...],
    empty: str = "exclude",
) -> tuple[dict, np.ndarray]:
    ap = average_precision(scores, labels, mask=known)
    report = _summarise_ap(ap, empty)
    out: dict = {
        "map": report["map"],
        "n_classes": int(scores.shape[1]),
        "n_classes_excluded": report["n_classes_excluded"],
        "n_images": int(scores.shape[0]),
        "gap": global_average_precision(scores, labels, mask=known),
    }
    for k in gap_ks:
        out[f"gap_at_{k}"] = global_average_precision(scores, labels, k=k, mask=known)
    for k in ks:
        f1, precision, recall = f1_at_k(scores, labels, k, mask=known)
        out[f"f1_at_{k}"] = f1
        out[f"precision_at_{k}"] = precision
        out[f"recall_at_{k}"] = recall
    return out, ap


def zsl_gzsl(
    scores: np.ndarray,
    labels: np.ndarray,
    unseen_mask: np.ndarray,
    mask: np.ndarray | None = None,
    ks: tuple[int, ...] = (3, 5),
    empty: str = "exclude",
) -> dict:
    """Zero-shot (ZSL) and generalised zero-shot (GZSL) metrics, keys prefixed "zsl_" / "gzsl_".

    ZSL ranks only the unseen classes, over the images with at least one unseen label; GZSL ranks all
    classes over all images. Each has map, gap, f1/precision/recall_at_k, n_images, n_classes.
    """
    scores, rel, known = _check(scores, labels, mask)
    unseen = np.asarray(unseen_mask)
    if unseen.shape != (scores.shape[1],) or unseen.dtype != bool:
        raise ValueError(
            f"unseen_mask must be a bool array of shape ({scores.shape[1]},), got {unseen.shape}"
        )
    if not unseen.any():
        raise ValueError("unseen_mask selects no classes: no zero-shot metrics to compute")

    rows = rel[:, unseen].sum(axis=1) > 0
    zsl, _ = _ranking_metrics(
        scores[rows][:, unseen], rel[rows][:, unseen], known[rows][:, unseen], ks, (), empty
    )
    gzsl, _ = _ranking_metrics(scores, rel, known, ks, (), empty)
    out = {f"zsl_{key}": value for key, value in zsl.items()}
    out.update({f"gzsl_{key}": value for key, value in gzsl.items()})
    return out


def evaluate_all(
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: list[str] | None = None,
    mask: np.ndarray | None = None,
    ks: tuple[int, ...] = (3, 5),
    gap_ks: tuple[int, ...] = (10,),
) -> dict:
    """The standard report for training, `evaluate`, benchmarks: floats plus "per_class_ap".

    Keys: map, n_classes, n_classes_excluded, n_images, gap, gap_at_10, f1_at_3, precision_at_3,
    recall_at_3, the same at 5, map_empty_as_zero, and per_class_ap {name: AP, NaN for no positives}.
    k larger than the number of classes is capped at it.
    """
    scores, rel, known = _check(scores, labels, mask)
    c = scores.shape[1]
    if class_names is None:
        class_names = [str(i) for i in range(c)]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class_names for {c} score columns")
    out, ap = _ranking_metrics(scores, rel, known, ks, gap_ks)
    out["map_empty_as_zero"] = _summarise_ap(ap, "zero")["map"]
    out["per_class_ap"] = {name: float(v) for name, v in zip(class_names, ap, strict=True)}
    return out


def label_prior_scores(train_labels: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Baseline scores [n, C]: every image gets each class's training frequency.

    A model should beat it. All images tie within a class, so its per-class AP is just that class's
    prevalence in the evaluated set; it still ranks classes within an image (GAP@k, F1@k).
    """
    train_labels = np.asarray(train_labels)
    if train_labels.ndim != 2:
        raise ValueError(f"train_labels must be 2-D [N, C], got shape {train_labels.shape}")
    _, rel, known = _check(np.zeros(train_labels.shape), train_labels, mask)
    n_known = known.sum(axis=0)
    prior = np.divide(rel.sum(axis=0), n_known, out=np.zeros(rel.shape[1]), where=n_known > 0)
    return np.broadcast_to(prior, (int(n), prior.size)).copy()
