"""Which images the review queue picks, on planted uncertain sets: near-threshold calls first, spread across
labels, `--labels` respected, every image at most once, the same queue whatever the row order."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.review import margins, review_queue, shortlist

THRESHOLDS = np.array([0.5, 0.1, 0.8])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def planted(n: int = 40) -> tuple[np.ndarray, list[str]]:
    """n images the model is sure of (4 logits from every threshold, alternately above and below), and a
    few planted close calls: label 0 on i03 and i07, label 1 on i11 and i15, label 2 on i20."""
    t = np.log(THRESHOLDS / (1 - THRESHOLDS))
    sign = np.where(np.arange(n)[:, None] % 2 == 0, 1.0, -1.0)
    logits = t[None, :] + 4.0 * sign + 0.01 * np.arange(n)[:, None]  # distinct margins, no ties
    for i, c, gap in ((3, 0, 0.01), (7, 0, -0.05), (11, 1, 0.02), (15, 1, -0.2), (20, 2, 0.03)):
        logits[i, c] = t[c] + gap
    return sigmoid(logits).astype(np.float32), [f"i{i:02d}" for i in range(n)]


def queued(scores, ids, k, columns=None) -> list[tuple[str, int]]:
    return [(ids[p.row], p.column) for p in review_queue(margins(scores, THRESHOLDS), ids, k, columns)]


def test_margins_are_logit_distances_so_low_and_high_thresholds_compare_fairly():
    scores = np.array([[0.52, 0.12, 1.0]])
    m = margins(scores, THRESHOLDS)[0]
    assert m[0] == pytest.approx(abs(np.log(0.52 / 0.48)), rel=1e-6)
    assert m[1] == pytest.approx(abs(np.log(0.12 / 0.88) - np.log(0.1 / 0.9)), rel=1e-6)
    # both scores are 0.02 above their threshold, but 0.12 vs 0.1 is the surer call
    assert m[0] < m[1]
    assert np.isfinite(m[2])  # a saturated score still has a margin


def test_the_planted_close_calls_come_first_one_label_at_a_time():
    scores, ids = planted()
    assert queued(scores, ids, 3) == [("i03", 0), ("i11", 1), ("i20", 2)]
    # second round: each label's next closest call; label 2 has no second planted one
    five = queued(scores, ids, 5)
    assert five[:3] == [("i03", 0), ("i11", 1), ("i20", 2)]
    assert five[3:] == [("i07", 0), ("i15", 1)]


def test_with_fewer_picks_than_labels_the_closest_calls_win():
    scores, ids = planted()
    assert queued(scores, ids, 2) == [("i03", 0), ("i11", 1)]


def test_labels_restrict_the_queue_to_their_columns():
    scores, ids = planted()
    only_1 = queued(scores, ids, 4, columns=[1])
    assert [c for _, c in only_1] == [1, 1, 1, 1]
    assert [i for i, _ in only_1[:2]] == ["i11", "i15"]
    assert queued(scores, ids, 2, columns=[2, 0]) == [("i03", 0), ("i20", 2)]


def test_k_beyond_the_images_queues_each_image_once():
    scores, ids = planted()
    scores, ids = scores[:12], ids[:12]
    picks = queued(scores, ids, 100)
    assert len(picks) == 12 and sorted(i for i, _ in picks) == sorted(ids)
    assert review_queue(margins(scores[:0], THRESHOLDS), [], 5) == []


def test_an_image_unsure_on_two_labels_is_queued_once():
    scores, ids = planted()
    t = np.log(THRESHOLDS / (1 - THRESHOLDS))
    scores[30] = sigmoid(t + 0.001)  # the closest call of every label
    picks = queued(scores, ids, 3)
    assert picks[0][0] == "i30"
    # the labels that lost i30 take their next closest in the next round, not a second copy
    assert picks[1:] == [("i03", 0), ("i11", 1)]
    assert len({i for i, _ in queued(scores, ids, 8)}) == 8


def test_ties_go_by_image_id_whatever_the_row_order():
    scores = np.full((6, 3), 0.9, np.float32)
    scores[:, 0] = 0.5  # label 0: every image exactly on its threshold
    ids = ["f", "b", "d", "a", "e", "c"]
    assert [i for i, _ in queued(scores, ids, 3, columns=[0])] == ["a", "b", "c"]
    perm = np.random.default_rng(0).permutation(6)
    assert queued(scores[perm], [ids[i] for i in perm], 3, columns=[0]) == queued(scores, ids, 3, columns=[0])


def test_a_queue_over_the_shortlists_of_batches_is_the_queue_over_all_rows():
    rng = np.random.default_rng(1)
    thresholds = rng.uniform(0.05, 0.9, 7)
    scores = rng.random((3000, 7)).astype(np.float32)
    ids = [f"img-{i:05d}" for i in rng.permutation(3000)]
    k = 25
    full = review_queue(margins(scores, thresholds), ids, k)
    kept_ids: list[str] = []
    kept = np.zeros((0, 7), np.float32)
    for start in range(0, 3000, 400):  # what read_candidates does with the batches of `current`
        kept_ids += ids[start : start + 400]
        kept = np.concatenate([kept, scores[start : start + 400]])
        keep = shortlist(margins(kept, thresholds), kept_ids, k)
        kept_ids, kept = [kept_ids[i] for i in keep], kept[keep]
    assert len(kept_ids) <= k * 7
    streamed = review_queue(margins(kept, thresholds), kept_ids, k)
    assert [(kept_ids[p.row], p.column) for p in streamed] == [(ids[p.row], p.column) for p in full]
