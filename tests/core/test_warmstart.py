"""Warm start (`mumic_core.warmstart`): a saved model's weights in a model over a changed taxonomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mumic_core import synthetic
from mumic_core.images import preprocess
from mumic_core.model import ModelError, MuMIC
from mumic_core.taxonomy import Label, Taxonomy
from mumic_core.warmstart import per_class_keys, transfer_weights, warm_start


@pytest.fixture(scope="module")
def saved():
    torch.manual_seed(3)
    model = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny", train_mode="image", init_tau=0.05)
    with torch.no_grad():
        model.bias.fill_(-0.7)
    model.set_thresholds(np.linspace(0.1, 0.8, len(synthetic.LABELS)))
    return model.eval()


@pytest.fixture(scope="module")
def pixels():
    images, _ = synthetic.make_arrays(6, seed=4, size=64)
    return np.stack([preprocess(im, 64) for im in images])


def test_adding_labels_keeps_every_weight_and_kept_threshold_exactly_and_the_kept_labels_scores(saved, pixels):
    grown = Taxonomy((*saved.taxonomy.labels, Label("purple"), Label("round object")), saved.taxonomy.templates)
    model, moved = warm_start(saved, grown)
    c = len(saved.taxonomy)
    before, after = saved.state_dict(), model.state_dict()
    shared = [k for k in before if k not in per_class_keys(saved)]
    assert shared and all(torch.equal(after[k], before[k]) for k in shared)  # every weight carried bit for bit
    # the kept labels' scores, to float32 rounding: a matmul over more label columns may be blocked
    # differently by the BLAS (one ulp in 1 of 48 on an AMD EPYC host)
    np.testing.assert_allclose(
        model.eval().score(pixels)[:, :c].numpy(), saved.score(pixels).numpy(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(model.thresholds[:c].numpy(), saved.thresholds.numpy())
    assert model.thresholds[c:].tolist() == [0.5, 0.5]  # new labels: the zero-shot default
    assert moved.added == ("purple", "round object") and moved.dropped == () and len(moved.kept) == c
    assert model.tau == pytest.approx(saved.tau) and model.bias.item() == pytest.approx(-0.7)


def test_new_labels_are_scored_through_their_text_embeddings_from_the_start(saved, pixels):
    grown = Taxonomy((*saved.taxonomy.labels, Label("purple")), saved.taxonomy.templates)
    model, _ = warm_start(saved, grown)
    zero_shot = saved.score_labels(pixels, ["purple"]).numpy()[:, 0]
    np.testing.assert_allclose(model.eval().score(pixels).numpy()[:, -1], zero_shot, rtol=1e-6)


def test_dropped_labels_disappear_and_kept_ones_move_with_their_names(saved, pixels):
    old = saved.taxonomy
    kept = [lb for lb in old.labels if lb.name not in ("blue", "dark background")]
    changed = Taxonomy((Label("purple"), *reversed(kept)), old.templates)  # reordered, one added, two dropped
    model, moved = warm_start(saved, changed)
    assert model.taxonomy.names == changed.names and model.thresholds.shape == (len(changed),)
    assert set(moved.dropped) == {"blue", "dark background"} and moved.added == ("purple",)
    before = saved.score(pixels).numpy()
    after = model.eval().score(pixels).numpy()
    for j, name in enumerate(changed.names[1:], start=1):
        i = old.index(name)
        np.testing.assert_allclose(after[:, j], before[:, i], rtol=1e-6)  # another column order: rounding
        assert float(model.thresholds[j]) == pytest.approx(float(saved.thresholds[i]))


def test_the_run_chooses_what_trains_but_the_backbone_comes_from_the_saved_model(saved):
    options = {"backbone": "ViT-B-32", "pretrained": "laion2b", "train_mode": "frozen", "learn_tau": False}
    model, _ = warm_start(saved, saved.taxonomy, options)
    assert model.config.backbone == "mumic-tiny" and model.config.pretrained is None
    assert model.config.train_mode == "frozen" and not model.log_tau.requires_grad
    assert not any(p.requires_grad for p in model.image_parameters())


class _PerClassHead(MuMIC):
    """A head with a per-label parameter, declared so that a warm start remaps it by name."""

    per_class_keys = ("thresholds", "class_offset")

    def __init__(self, config, taxonomy, clip=None):
        super().__init__(config, taxonomy, clip)
        self.class_offset = nn.Parameter(torch.zeros(len(taxonomy)))


def test_declared_per_class_parameters_are_remapped_by_label_name(saved):
    source = _PerClassHead(saved.config, saved.taxonomy)
    with torch.no_grad():
        source.class_offset.copy_(torch.arange(len(saved.taxonomy), dtype=torch.float32))
    changed = Taxonomy((Label("purple"), Label("green"), Label("red")), saved.taxonomy.templates)
    model, _ = warm_start(source, changed)
    assert model.class_offset.tolist() == [0.0, 1.0, 0.0]  # new: the default; green was row 1, red row 0


def test_weights_that_do_not_fit_are_refused_in_one_line(saved):
    arch = {**saved.config.arch, "embed_dim": 32}
    other = MuMIC(type(saved.config)(backbone="mumic-tiny", arch=arch), saved.taxonomy)
    with pytest.raises(ModelError, match="cannot warm-start: .* in the saved model"):
        transfer_weights(saved, other)
