"""Spec for mumic_core.metrics: AP/mAP against sklearn, GAP@k against a loop reference, hand cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from mumic_core import metrics


def _random_case(seed: int, n: int = 120, c: int = 6, p: float = 0.3):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < p).astype(int)
    labels[0] = 1  # every class has a positive, so sklearn and we agree on what to average
    scores = rng.normal(size=(n, c)) + 1.5 * labels
    return scores, labels


def _sklearn_ap(scores, labels):
    return np.array([average_precision_score(labels[:, j], scores[:, j]) for j in range(labels.shape[1])])


def _gap_reference(scores, labels, k=None):
    """GAP@k the slow, obvious way (YouTube-8M definition)."""
    n, c = scores.shape
    k = c if k is None else min(k, c)
    pooled = []
    for i in range(n):
        ranked = sorted(range(c), key=lambda j: -scores[i, j])[:k]
        pooled += [(scores[i, j], labels[i, j]) for j in ranked]
    pooled.sort(key=lambda pair: -pair[0])
    hits, total = 0, 0.0
    for rank, (_, rel) in enumerate(pooled, start=1):
        if rel:
            hits += 1
            total += hits / rank
    return total / labels.sum()


# ----------------------------------------------------------------------------- AP / mAP


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_on_random_scores(seed):
    scores, labels = _random_case(seed)
    np.testing.assert_allclose(
        metrics.average_precision(scores, labels), _sklearn_ap(scores, labels), atol=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_matches_sklearn_with_tied_scores(seed):
    scores, labels = _random_case(seed)
    tied = np.round(scores)  # a handful of distinct values per class: many large tie groups
    assert len(np.unique(tied[:, 0])) < len(tied) // 4
    np.testing.assert_allclose(metrics.average_precision(tied, labels), _sklearn_ap(tied, labels), atol=1e-6)


def test_average_precision_and_gap_do_not_depend_on_order_among_ties():
    scores, labels = _random_case(3)
    tied = np.round(scores)
    perm = np.random.default_rng(0).permutation(len(tied))
    np.testing.assert_allclose(
        metrics.average_precision(tied[perm], labels[perm]), metrics.average_precision(tied, labels)
    )
    assert metrics.global_average_precision(tied[perm], labels[perm]) == pytest.approx(
        metrics.global_average_precision(tied, labels)
    )


def test_average_precision_is_nan_for_class_without_positives():
    scores, labels = _random_case(4)
    labels[:, 2] = 0
    ap = metrics.average_precision(scores, labels)
    assert np.isnan(ap[2])
    assert not np.isnan(np.delete(ap, 2)).any()


def test_mean_average_precision_matches_sklearn_macro_average():
    scores, labels = _random_case(5)
    expected = average_precision_score(labels, scores, average="macro")
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(expected, abs=1e-6)


def test_mean_average_precision_excludes_empty_classes_by_default_and_counts_them_as_zero_on_request():
    scores, labels = _random_case(6, c=5)
    labels[:, [1, 3]] = 0
    ap = metrics.average_precision(scores, labels)
    non_empty = ap[[0, 2, 4]]

    report = metrics.map_report(scores, labels)
    assert report["n_classes_excluded"] == 2
    assert report["n_classes_averaged"] == 3
    assert report["map"] == pytest.approx(non_empty.mean())
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(non_empty.mean())

    zero = metrics.map_report(scores, labels, empty="zero")
    assert zero["n_classes_excluded"] == 0
    assert zero["map"] == pytest.approx(non_empty.sum() / 5)


def test_mean_average_precision_is_nan_when_no_class_has_positives():
    scores, labels = _random_case(7)
    assert math.isnan(metrics.mean_average_precision(scores, np.zeros_like(labels)))


def test_mean_average_precision_over_top_k_classes_uses_classes_with_most_positives():
    rng = np.random.default_rng(8)
    n = 200
    prevalence = np.array([0.05, 0.6, 0.1, 0.4, 0.2])  # majority classes: 1, then 3
    labels = (rng.random((n, 5)) < prevalence).astype(int)
    labels[0] = 1
    scores = rng.normal(size=(n, 5)) + labels
    ap = metrics.average_precision(scores, labels)
    assert list(np.argsort(-labels.sum(axis=0))[:2]) == [1, 3]
    assert metrics.mean_average_precision(scores, labels, top_k_classes=2) == pytest.approx(ap[[1, 3]].mean())
    assert metrics.mean_average_precision(scores, labels, top_k_classes=99) == pytest.approx(ap.mean())


def test_masked_entries_are_left_out_of_each_class_ranking():
    scores, labels = _random_case(9, n=150)
    mask = (np.random.default_rng(1).random(labels.shape) > 0.3).astype(int)
    mask[0] = 1
    ap = metrics.average_precision(scores, labels, mask=mask)
    for j in range(labels.shape[1]):
        known = mask[:, j] == 1
        assert ap[j] == pytest.approx(average_precision_score(labels[known, j], scores[known, j]), abs=1e-6)


def test_evaluate_all_ignores_labels_and_scores_of_masked_entries():
    scores, labels = _random_case(10, n=80, c=8)
    mask = (np.random.default_rng(2).random(labels.shape) > 0.25).astype(int)
    rng = np.random.default_rng(3)
    unknown = mask == 0
    scores2, labels2 = scores.copy(), labels.copy()
    scores2[unknown] = rng.normal(size=unknown.sum()) + 10  # would top every ranking if not ignored
    labels2[unknown] = 1 - labels2[unknown]

    a = metrics.evaluate_all(scores, labels, mask=mask)
    b = metrics.evaluate_all(scores2, labels2, mask=mask)
    unmasked = metrics.evaluate_all(scores2, labels2)
    for key in ("map", "gap", "gap_at_10", "f1_at_3", "precision_at_5", "recall_at_5"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["map"] != pytest.approx(unmasked["map"])  # the perturbation matters when not masked


# ----------------------------------------------------------------------------- GAP@k


@pytest.mark.parametrize("k", [None, 1, 3, 20])
def test_global_average_precision_matches_loop_reference(k):
    scores, labels = _random_case(11, n=60, c=8, p=0.35)
    expected = _gap_reference(scores, labels, k)
    assert metrics.global_average_precision(scores, labels, k=k) == pytest.approx(expected, abs=1e-9)


def test_gap_at_k_is_below_one_when_an_image_has_more_labels_than_k():
    labels = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    scores = labels + np.array([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.4, 0.3, 0.2, 0.0]])  # perfect ranking
    assert metrics.global_average_precision(scores, labels) == pytest.approx(1.0)
    # top-2 pools image 0's two best (both relevant) and image 1's two (one relevant): the three
    # relevant pairs rank first with precision 1 each, but M counts all 5 labels -> 3 / 5.
    assert metrics.global_average_precision(scores, labels, k=2) == pytest.approx(0.6)


# ----------------------------------------------------------------------------- F1@k


def test_f1_at_k_on_hand_computed_case():
    scores = np.array(
        [
            [0.9, 0.8, 0.1, 0.2],
            [0.1, 0.7, 0.6, 0.3],
            [0.5, 0.4, 0.3, 0.9],
        ]
    )
    labels = np.array(
        [
            [1, 0, 1, 0],
            [0, 1, 1, 1],
            [0, 0, 0, 0],
        ]
    )
    # k=2 -> image 0 predicts {0, 1}: TP 1, FP 1, FN 1 (class 2)
    #        image 1 predicts {1, 2}: TP 2, FP 0, FN 1 (class 3)
    #        image 2 predicts {3, 0}: TP 0, FP 2, FN 0
    # pooled: TP 3 of 6 predictions -> P = 0.5; 3 of 5 positives -> R = 0.6; F1 = 2*0.3/1.1 = 6/11
    f1, precision, recall = metrics.f1_at_k(scores, labels, k=2)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.6)
    assert f1 == pytest.approx(6 / 11)
    assert metrics.precision_recall_at_k(scores, labels, k=2) == pytest.approx((0.5, 0.6))


def test_f1_at_k_caps_k_at_number_of_classes():
    scores, labels = _random_case(12, n=30, c=4)
    assert metrics.f1_at_k(scores, labels, k=10) == pytest.approx(metrics.f1_at_k(scores, labels, k=4))
    _, precision, recall = metrics.f1_at_k(scores, labels, k=10)
    assert recall == pytest.approx(1.0)  # every class predicted for every image
    assert precision == pytest.approx(labels.mean())


# ----------------------------------------------------------------------------- thresholds


def test_tune_thresholds_finds_perfect_separating_threshold_on_separable_data():
    rng = np.random.default_rng(13)
    n, c = 100, 4
    labels = (rng.random((n, c)) < 0.4).astype(int)
    labels[0, :3] = 1
    labels[:, 3] = 0  # no positives: falls back to the default
    offset = np.array([0.0, 2.0, -5.0, 0.0])  # separable at a different place in each class
    scores = np.where(labels == 1, rng.uniform(0.6, 0.9, (n, c)), rng.uniform(0.1, 0.4, (n, c))) + offset

    thresholds = metrics.tune_thresholds(scores, labels, default=0.77)
    assert thresholds[3] == 0.77
    for j in range(3):
        pos, neg = scores[labels[:, j] == 1, j], scores[labels[:, j] == 0, j]
        assert neg.max() < thresholds[j] < pos.min()
    result = metrics.threshold_metrics(scores, labels, thresholds)
    np.testing.assert_allclose(result["per_class_f1"][:3], 1.0)
    assert np.isnan(result["per_class_f1"][3])
    assert result["f1"] == pytest.approx(1.0)
    assert result["macro_f1"] == pytest.approx(1.0)


def test_threshold_metrics_on_hand_computed_case():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.8], [0.1, 0.4]])
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    # threshold 0.5: class 0 predicts rows {0, 1}: TP 1, FP 1, FN 1 -> P 0.5, R 0.5, F1 0.5
    #                class 1 predicts rows {1, 2}: TP 2, FP 0, FN 0 -> P 1, R 1, F1 1
    # micro: TP 3 of 4 predictions, 3 of 4 positives -> P = R = F1 = 0.75
    result = metrics.threshold_metrics(scores, labels, 0.5)
    np.testing.assert_allclose(result["per_class_precision"], [0.5, 1.0])
    np.testing.assert_allclose(result["per_class_recall"], [0.5, 1.0])
    np.testing.assert_allclose(result["per_class_f1"], [0.5, 1.0])
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert result["macro_f1"] == pytest.approx(0.75)


def test_pr_curve_matches_sklearn_precision_recall_curve():
    scores, labels = _random_case(14, n=50, c=1)
    s = np.round(scores[:, 0], 1)  # some ties
    precision, recall, thresholds = metrics.pr_curve(s, labels[:, 0])
    assert np.all(np.diff(thresholds) < 0)
    sk_precision, sk_recall, sk_thresholds = precision_recall_curve(labels[:, 0], s)
    # sklearn: ascending thresholds plus a final (P=1, R=0) point, possibly cut at full recall.
    sk_precision, sk_recall, sk_thresholds = (
        sk_precision[:-1][::-1],
        sk_recall[:-1][::-1],
        sk_thresholds[::-1],
    )
    m = len(sk_thresholds)
    np.testing.assert_allclose(thresholds[:m], sk_thresholds)
    np.testing.assert_allclose(precision[:m], sk_precision)
    np.testing.assert_allclose(recall[:m], sk_recall)
    assert recall[-1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- ZSL / GZSL


def test_zsl_gzsl_on_small_case():
    # classes 1 and 2 are unseen; image 1 has no unseen label so ZSL leaves it out.
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]])
    scores = np.array([[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.1, 0.3, 0.4], [0.25, 0.5, 0.9]])
    unseen = np.array([False, True, True])
    out = metrics.zsl_gzsl(scores, labels, unseen)

    assert out["zsl_n_images"] == 3
    assert out["zsl_n_classes"] == 2
    # class 1 over images {0, 2, 3}: ranks img3 (rel), img2, img0 (rel) -> AP = (1 + 2/3) / 2 = 5/6
    # class 2: img3 (rel), img0, img2 (rel) -> AP = 5/6
    assert out["zsl_map"] == pytest.approx(5 / 6)
    # pooled ZSL scores 0.9+ 0.6 0.5+ 0.4+ 0.3 0.2+ (+ relevant), M = 4 -> (1 + 2/3 + 3/4 + 4/6) / 4
    assert out["zsl_gap"] == pytest.approx(37 / 48)
    # k=3 capped at the 2 unseen classes: all 6 predicted, 4 relevant -> P 2/3, R 1, F1 0.8
    assert out["zsl_f1_at_3"] == pytest.approx(0.8)
    assert out["zsl_precision_at_3"] == pytest.approx(2 / 3)

    assert out["gzsl_n_images"] == 4
    assert out["gzsl_map"] == pytest.approx(metrics.mean_average_precision(scores, labels))
    assert out["gzsl_gap"] == pytest.approx(_gap_reference(scores, labels))
    assert out["gzsl_f1_at_5"] == pytest.approx(metrics.f1_at_k(scores, labels, 3)[0])


def test_zsl_gzsl_rejects_unseen_mask_without_unseen_classes():
    scores, labels = _random_case(15, n=10, c=3)
    with pytest.raises(ValueError, match="unseen"):
        metrics.zsl_gzsl(scores, labels, np.zeros(3, dtype=bool))


# ----------------------------------------------------------------------------- reports, baselines


def test_evaluate_all_reports_standard_keys_and_caps_k_at_number_of_classes():
    scores, labels = _random_case(16, n=40, c=4)
    labels[:, 2] = 0
    names = ["cat", "dog", "unicorn", "tree"]
    out = metrics.evaluate_all(scores, labels, class_names=names)

    for key in (
        "map",
        "gap",
        "gap_at_10",
        "f1_at_3",
        "precision_at_3",
        "recall_at_3",
        "f1_at_5",
        "n_classes_excluded",
    ):
        assert isinstance(out[key], float | int), key
    assert out["n_classes_excluded"] == 1
    assert out["gap_at_10"] == pytest.approx(out["gap"])  # k = 10 > C = 4 keeps every prediction
    assert out["f1_at_5"] == pytest.approx(metrics.f1_at_k(scores, labels, 4)[0])
    assert set(out["per_class_ap"]) == set(names)
    assert math.isnan(out["per_class_ap"]["unicorn"])
    assert out["per_class_ap"]["dog"] == pytest.approx(average_precision_score(labels[:, 1], scores[:, 1]))
    assert out["map"] == pytest.approx(np.mean([out["per_class_ap"][n] for n in ("cat", "dog", "tree")]))


def test_label_prior_scores_give_per_class_ap_equal_to_prevalence():
    train_scores, train_labels = _random_case(17, n=100, c=5)
    test_scores, test_labels = _random_case(18, n=70, c=5)
    prior = metrics.label_prior_scores(train_labels, n=len(test_labels))
    assert prior.shape == test_labels.shape
    np.testing.assert_allclose(prior[0], train_labels.mean(axis=0))
    np.testing.assert_allclose(metrics.average_precision(prior, test_labels), test_labels.mean(axis=0))
    assert metrics.mean_average_precision(test_scores, test_labels) > metrics.mean_average_precision(
        prior, test_labels
    )


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "call",
    [
        lambda s, y: metrics.average_precision(s, y[:, :3]),
        lambda s, y: metrics.mean_average_precision(s[:5], y),
        lambda s, y: metrics.global_average_precision(s[0], y[0]),
        lambda s, y: metrics.f1_at_k(s, y.T, k=3),
        lambda s, y: metrics.average_precision(s, y, mask=np.ones((3, 3))),
        lambda s, y: metrics.average_precision(s, y * 2),
        lambda s, y: metrics.threshold_metrics(s, y, np.full(3, 0.5)),
        lambda s, y: metrics.evaluate_all(s, y, class_names=["a", "b"]),
        lambda s, y: metrics.zsl_gzsl(s, y, np.array([True, False])),
        lambda s, y: metrics.f1_at_k(s, y, k=0),
    ],
)
def test_shape_mismatch_and_bad_inputs_raise_value_error(call):
    scores, labels = _random_case(19, n=10, c=4)
    with pytest.raises(ValueError):
        call(scores, labels)
