"""The open-vocabulary protocol's metrics (methods.md §4) on a case small enough to check by hand.

Four images, labels a, b (seen) and u, v (unseen):

            truth        scores
            a b u v      a    b    u    v
    img0    1 0 1 0      .9   .2   .6   .5
    img1    0 1 0 0      .3   .8   .25  .1     <- no unseen label: not a ZSL image
    img2    1 1 0 1      .6   .7   .4   .3
    img3    0 1 1 1      .1   .4   .2   .8

ZSL ranks u, v over img0, img2, img3 only:
    u: img0 (+) .6, img2 (-) .4, img3 (+) .2  -> AP = (1/1 + 2/3) / 2 = 5/6
    v: img3 (+) .8, img0 (-) .5, img2 (+) .3  -> AP = (1/1 + 2/3) / 2 = 5/6      ZSL mAP = 5/6
    F1@3 and F1@5 (k capped at 2 classes): all 6 predicted, 4 true -> P 4/6, R 1, F1 = 0.8
    F1@1: img0 u (+), img2 u (-), img3 v (+) -> P 2/3, R 2/4, F1 = 4/7
GZSL ranks all four over all four images:
    a: AP 1; b: img1 .8 (+), img2 .7 (+), img3 .4 (+), img0 .2 (-) -> AP 1
    u: img0 .6 (+), img2 .4 (-), img1 .25 (-), img3 .2 (+) -> AP (1 + 2/4) / 2 = 3/4
    v: 5/6 as above, img1 (-) last                                    GZSL mAP = (1 + 1 + 3/4 + 5/6) / 4 = 43/48
    F1@3: top-3 hits 2 + 1 + 2 + 3 = 8 of 12 predictions and 9 positives -> F1 = 2·(2/3)(8/9) / (2/3 + 8/9) = 16/21
    F1@5 (capped at 4): 9 of 16, recall 1 -> F1 = 2·(9/16) / (25/16) = 18/25
"""

from __future__ import annotations

import numpy as np
import pytest

from mumic_core import metrics
from mumic_core.taxonomy import Label, Taxonomy
from pipelines.evaluation import Scored, report

LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=np.uint8)
SCORES = np.array(
    [[0.9, 0.2, 0.6, 0.5], [0.3, 0.8, 0.25, 0.1], [0.6, 0.7, 0.4, 0.3], [0.1, 0.4, 0.2, 0.8]], dtype=np.float32
)
UNSEEN = np.array([False, False, True, True])
BY_HAND = {
    "zsl_map": 5 / 6,
    "zsl_f1_at_1": 4 / 7,
    "zsl_f1_at_3": 0.8,
    "zsl_f1_at_5": 0.8,
    "zsl_n_images": 3,
    "zsl_n_classes": 2,
    "gzsl_map": 43 / 48,
    "gzsl_f1_at_3": 16 / 21,
    "gzsl_f1_at_5": 18 / 25,
    "gzsl_n_images": 4,
    "gzsl_n_classes": 4,
}


def test_zsl_and_gzsl_metrics_equal_the_hand_computed_values():
    got = metrics.zsl_gzsl(SCORES, LABELS, UNSEEN, ks=(1, 3, 5))
    for key, value in BY_HAND.items():
        assert got[key] == pytest.approx(value), key


def test_zsl_ignores_images_without_an_unseen_label_and_gzsl_does_not():
    moved = SCORES.copy()
    moved[1, 2] = 0.95  # img1 has no unseen label: it now outranks every u-positive
    got = metrics.zsl_gzsl(moved, LABELS, UNSEEN)
    assert got["zsl_map"] == pytest.approx(5 / 6)
    assert got["gzsl_map"] == pytest.approx((1 + 1 + (1 / 2 + 2 / 4) / 2 + 5 / 6) / 4)


def _taxonomy() -> Taxonomy:
    return Taxonomy((Label("a"), Label("b"), Label("u", unseen=True), Label("v", unseen=True)))


def test_a_report_with_unseen_truth_carries_and_prints_zsl_and_gzsl_map_f1_at_3_and_f1_at_5():
    scored = Scored(np.array(["0", "1", "2", "3"]), SCORES, LABELS, np.ones_like(LABELS))
    rep = report(scored, _taxonomy(), "test")
    for key in ("zsl_map", "zsl_f1_at_3", "zsl_f1_at_5", "gzsl_map", "gzsl_f1_at_3", "gzsl_f1_at_5"):
        assert rep.metrics[key] == pytest.approx(BY_HAND[key]), key
    line = rep.headline()
    for shown in ("zsl_map 0.8333", "zsl_f1_at_3 0.8000", "zsl_f1_at_5 0.8000", "gzsl_map 0.8958",
                  "gzsl_f1_at_3 0.7619", "gzsl_f1_at_5 0.7200"):
        assert shown in line, line
    assert rep.metrics["map"] == pytest.approx(43 / 48)  # all labels' truth known: mAP is the GZSL mAP


def test_a_report_of_a_training_split_where_unseen_labels_are_masked_has_no_zero_shot_metrics():
    mask = np.ones_like(LABELS)
    mask[:, UNSEEN] = 0  # what training's validation split looks like: unseen truth dropped
    rep = report(Scored(np.array(["0", "1", "2", "3"]), SCORES, LABELS, mask), _taxonomy(), "val")
    assert not [k for k in rep.metrics if k.startswith(("zsl_", "gzsl_"))]
    assert "zsl" not in rep.headline()
    assert rep.metrics["map"] == pytest.approx(1.0) and rep.metrics["n_classes_excluded"] == 2


def test_compositional_generated_labels_keep_the_images_and_base_labels_of_existing_callers():
    from mumic_core import synthetic

    plain_images, plain = synthetic.make_arrays(40, seed=3, size=32)
    images, labels = synthetic.make_arrays(40, seed=3, size=32, compositional=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain_images, images, strict=True))
    c = len(synthetic.LABELS)
    np.testing.assert_array_equal(labels[:, :c], plain)
    names = synthetic.label_names(compositional=True)
    for row in labels:  # a pair is on only when both of its words are
        for j in np.nonzero(row[c:])[0]:
            kind, colour, _ = names[c + j].split()
            assert row[names.index(colour)] and row[names.index(f"{kind} object")]
    assert set(synthetic.COMPOSITIONAL_UNSEEN) <= set(synthetic.COMPOSITIONAL_LABELS)
