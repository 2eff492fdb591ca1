"""Which images an annotator should look at first: the ones whose labels the model is least sure of.

Pure numpy, no tables: `margins` says how far each score is from its label's threshold, `review_queue`
picks k images round-robin over the labels, and `shortlist` keeps what a streamed read must carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

EPS = 1e-6  # scores of exactly 0 or 1 (saturated sigmoids) still get a finite logit


class Pick(NamedTuple):
    """One image of the queue: its row, the label it is unsure of (a column) and how unsure."""

    row: int
    column: int
    margin: float


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def margins(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """|logit(score) - logit(threshold)| [N, C]: 0 on the threshold, larger the surer the model.

    In logit space a label tuned to 0.05 and one tuned to 0.6 compare fairly: 0.06 vs 0.05 is as close
    a call as 0.62 vs 0.6, which a plain |score - threshold| would not say.
    """
    return np.abs(logit(scores) - logit(thresholds)[None, :])


def _id_rank(image_ids: Sequence[str]) -> np.ndarray:
    """Each id's place in sorted order [N]: the tie-break that makes a queue the same on every read."""
    ids = np.asarray(image_ids, dtype=object)
    rank = np.empty(len(ids), np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    return rank


def _ranked(margin: np.ndarray, id_rank: np.ndarray, depth: int) -> np.ndarray:
    """Per column, its `depth` most uncertain rows, most uncertain first, ties by image_id: [C, depth]."""
    cols = margin.T  # [C, N]
    order = np.lexsort((np.broadcast_to(id_rank, cols.shape), cols), axis=-1)  # [C, N]
    return order[:, :depth]


def shortlist(margin: np.ndarray, image_ids: Sequence[str], k: int) -> np.ndarray:
    """Rows [M] that can still be in a k-queue over these columns: each column's k most uncertain.

    A label's turns only ever reach its k most uncertain images (each image it skips is one another
    label took, and at most k are taken), so a queue over the shortlist is the queue over all rows:
    a table read in batches keeps only this much.
    """
    if margin.shape[0] == 0 or margin.shape[1] == 0 or k <= 0:
        return np.zeros(0, np.int64)
    return np.unique(_ranked(margin, _id_rank(image_ids), min(k, margin.shape[0])))


def review_queue(
    margin: np.ndarray, image_ids: Sequence[str], k: int, columns: Sequence[int] | None = None
) -> list[Pick]:
    """Up to k distinct images, spread across labels: round-robin, each label in turn giving its most
    uncertain image not yet taken (smallest margin; ties by image_id).

    Within a round the labels go most uncertain first, so with fewer picks than labels the closest calls
    win. An image that two labels are unsure of is taken once, for the label whose turn came first.
    `columns` restricts the labels (default: all). margin [N, C] from `margins`.
    """
    n, c = margin.shape
    columns = list(range(c)) if columns is None else [int(j) for j in columns]
    if n == 0 or not columns or k <= 0:
        return []
    id_rank = _id_rank(image_ids)
    ranked = _ranked(margin[:, columns], id_rank, min(k, n))  # [L, depth]
    nxt = [0] * len(columns)  # per label: the first place in its ranking not looked at yet
    taken: set[int] = set()
    picks: list[Pick] = []
    while len(picks) < k:
        offers = []
        for j in range(len(columns)):
            while nxt[j] < ranked.shape[1] and int(ranked[j, nxt[j]]) in taken:
                nxt[j] += 1
            if nxt[j] < ranked.shape[1]:
                row = int(ranked[j, nxt[j]])
                offers.append((float(margin[row, columns[j]]), int(id_rank[row]), j, row))
        if not offers:
            break
        for m, _, j, row in sorted(offers):
            if len(picks) == k:
                break
            if row in taken:  # offered by a label that went earlier in this round
                continue
            taken.add(row)
            nxt[j] += 1
            picks.append(Pick(row, columns[j], m))
    return picks
