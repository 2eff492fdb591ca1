"""Spec of mumic_core.losses: each loss against a direct formula, gradients, masking and stability."""

import math

import pytest
import torch
import torch.nn.functional as F

from mumic_core.losses import (
    LOSSES,
    asymmetric_loss,
    class_frequency_weights,
    distillation_l1,
    get_loss,
    multi_positive_infonce,
    ranking_loss,
    tempered_sigmoid_bce,
)

TAU = 0.1
BIAS = 0.3


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.8 - 0.4  # [B, C], moderate logits
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float64)
    return {"sim": sim, "labels": labels, "mask": mask}


def _direct_bce(sim, labels, mask, weight):
    """The MuMIC formula written out naively; fine for moderate logits in float64."""
    p = torch.sigmoid(sim / TAU + BIAS)
    terms = labels * torch.log(p) + (1 - labels) * torch.log(1 - p)
    return -(mask * weight * terms).sum() / mask.sum()


def _direct_asl(logits, labels, mask, gamma_pos, gamma_neg, clip):
    p = torch.sigmoid(logits)
    p_m = torch.clamp(p - clip, min=0)
    terms = labels * (1 - p) ** gamma_pos * torch.log(p) + (1 - labels) * p_m**gamma_neg * torch.log(1 - p_m)
    return -(mask * terms)


def _mumic(batch, **kw):
    return tempered_sigmoid_bce(
        batch["sim"], batch["labels"], math.log(TAU), bias=BIAS, mask=batch["mask"], **kw
    )


def test_tempered_sigmoid_bce_without_weighting_equals_direct_formula(batch):
    expected = _direct_bce(batch["sim"], batch["labels"], batch["mask"], 1.0)
    torch.testing.assert_close(_mumic(batch), expected)


def test_tempered_sigmoid_bce_focal_weighting_equals_direct_formula(batch):
    p = torch.sigmoid(batch["sim"] / TAU + BIAS)
    p_t = torch.where(batch["labels"] == 1, p, 1 - p)
    expected = _direct_bce(batch["sim"], batch["labels"], batch["mask"], (1 - p_t) ** 2.0)
    torch.testing.assert_close(_mumic(batch, weighting="focal", gamma=2.0), expected)


def test_tempered_sigmoid_bce_class_frequency_weighting_equals_direct_formula(batch):
    class_weights = torch.tensor([0.5, 2.0, 1.0, 0.5], dtype=torch.float64)
    expected = _direct_bce(batch["sim"], batch["labels"], batch["mask"], class_weights[None, :])
    loss = _mumic(batch, weighting="class_frequency", class_weights=class_weights)
    torch.testing.assert_close(loss, expected)


def test_tempered_sigmoid_bce_asymmetric_weighting_equals_direct_asl_formula(batch):
    logits = batch["sim"] / TAU + BIAS
    terms = _direct_asl(logits, batch["labels"], batch["mask"], gamma_pos=1.0, gamma_neg=4.0, clip=0.05)
    expected = terms.sum() / batch["mask"].sum()
    loss = _mumic(batch, weighting="asymmetric", gamma_pos=1.0, gamma_neg=4.0, clip=0.05)
    torch.testing.assert_close(loss, expected)


def test_class_frequency_needs_class_weights_and_unknown_weighting_is_rejected(batch):
    with pytest.raises(ValueError, match="class_weights"):
        _mumic(batch, weighting="class_frequency")
    with pytest.raises(ValueError, match="unknown weighting"):
        _mumic(batch, weighting="focall")


@pytest.mark.parametrize("weighting", ["none", "focal"])
def test_tempered_sigmoid_bce_passes_gradcheck_wrt_sim_log_tau_and_bias(batch, weighting):
    sim = batch["sim"].clone().requires_grad_()
    log_tau = torch.tensor(math.log(TAU), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)

    def loss(s, lt, b):
        # gradcheck differentiates numerically through everything, so the focal weight must not be detached
        return tempered_sigmoid_bce(
            s, batch["labels"], lt, bias=b, mask=batch["mask"], weighting=weighting, detach_weight=False
        )

    assert torch.autograd.gradcheck(loss, (sim, log_tau, bias))


def test_focal_weight_is_a_constant_in_the_gradient(batch):
    sim = batch["sim"].clone().requires_grad_()
    _mumic({**batch, "sim": sim}, weighting="focal", gamma=2.0).backward()
    z = batch["sim"] / TAU + BIAS
    p = torch.sigmoid(z)
    p_t = torch.where(batch["labels"] == 1, p, 1 - p)
    # d/ds of -w·log p_t with w held fixed is w·(p − y)/τ
    expected = batch["mask"] * (1 - p_t) ** 2 * (p - batch["labels"]) / TAU / batch["mask"].sum()
    torch.testing.assert_close(sim.grad, expected)


@pytest.mark.parametrize("weighting", ["none", "focal", "asymmetric", "class_frequency"])
def test_masked_entries_change_neither_loss_nor_other_gradients_and_get_zero_grad(batch, weighting):
    class_weights = torch.tensor([0.5, 2.0, 1.0, 0.5], dtype=torch.float64)
    unknown = batch["mask"] == 0

    def loss_and_grad(sim, labels):
        sim = sim.clone().requires_grad_()
        loss = tempered_sigmoid_bce(
            sim,
            labels,
            math.log(TAU),
            bias=BIAS,
            mask=batch["mask"],
            weighting=weighting,
            class_weights=class_weights,
        )
        loss.backward()
        return loss.detach(), sim.grad

    loss_a, grad_a = loss_and_grad(batch["sim"], batch["labels"])
    sim_b = torch.where(unknown, torch.full_like(batch["sim"], 0.99), batch["sim"])
    labels_b = torch.where(unknown, 1 - batch["labels"], batch["labels"])
    loss_b, grad_b = loss_and_grad(sim_b, labels_b)

    assert loss_a == loss_b
    assert torch.equal(grad_a[~unknown], grad_b[~unknown])
    assert torch.all(grad_a[unknown] == 0) and torch.all(grad_b[unknown] == 0)
    assert grad_a[~unknown].abs().sum() > 0


def test_hard_negative_gets_exponentially_larger_gradient_than_easy_negative():
    tau, bias = 0.05, -2.0
    sim = torch.tensor([[-0.2, -0.5]], dtype=torch.float64, requires_grad=True)  # two negatives
    tempered_sigmoid_bce(sim, torch.zeros(1, 2), math.log(tau), bias=bias).backward()
    ratio = sim.grad[0, 0] / sim.grad[0, 1]
    # grad on a negative is p/τ ≈ exp(s/τ + b)/τ while p is small
    assert ratio > 100
    assert ratio == pytest.approx(math.exp(0.3 / tau), rel=0.05)


@pytest.mark.parametrize(
    ("weighting", "clip"), [("none", 0.0), ("focal", 0.0), ("asymmetric", 0.0), ("asymmetric", 0.05)]
)
def test_extreme_similarities_with_tiny_tau_give_finite_loss_and_grads(weighting, clip):
    sim = torch.tensor([[1.0, -1.0, 1.0, -1.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    log_tau = torch.tensor(math.log(1e-4), requires_grad=True)
    bias = torch.tensor(0.0, requires_grad=True)
    loss = tempered_sigmoid_bce(sim, labels, log_tau, bias=bias, weighting=weighting, clip=clip)
    loss.backward()
    assert torch.isfinite(loss) and loss > 1000  # two confidently wrong entries at |z| = 1e4
    for g in (sim.grad, log_tau.grad, bias.grad):
        assert torch.all(torch.isfinite(g))
    assert sim.grad.abs().max() > 0


def test_class_frequency_weights_are_inverse_frequency_normalised_to_mean_one():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    w = class_frequency_weights(labels)
    # frequencies 3/4, 1/4 and none (counted as 1/4): inverse 4/3, 4, 4
    raw = torch.tensor([4 / 3, 4.0, 4.0])
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0)


def test_class_frequency_weights_ignore_unknown_labels():
    labels = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 0]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]])  # class 0: 2 known, both positive
    w = class_frequency_weights(labels, mask)
    raw = torch.tensor([1.0, 4.0])
    torch.testing.assert_close(w, raw / raw.mean())


def test_asymmetric_loss_equals_direct_formula_for_sum_and_mean(batch):
    logits = batch["sim"] * 5
    terms = _direct_asl(logits, batch["labels"], batch["mask"], gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
    loss_sum = asymmetric_loss(logits, batch["labels"], mask=batch["mask"])
    loss_mean = asymmetric_loss(logits, batch["labels"], mask=batch["mask"], reduction="mean")
    torch.testing.assert_close(loss_sum, terms.sum())
    torch.testing.assert_close(loss_mean, terms.sum() / batch["mask"].sum())


def test_asymmetric_loss_with_gamma_zero_and_clip_zero_is_plain_bce_sum(batch):
    logits = batch["sim"] * 5
    loss = asymmetric_loss(logits, batch["labels"], gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    expected = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_asymmetric_loss_treats_focusing_weight_as_constant():
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    asymmetric_loss(logits, labels, gamma_pos=1.0, gamma_neg=4.0, clip=0.05).backward()
    p = torch.sigmoid(logits.detach())
    p_m = p - 0.05
    # positive: -(1-p)·log p → (1-p)·(p-1); negative: -p_m^4·log(1-p_m) → p_m^4 · p(1-p)/(1-p_m)
    expected = torch.stack(
        [(1 - p[0, 0]) * (p[0, 0] - 1), p_m[0, 1] ** 4 * p[0, 1] * (1 - p[0, 1]) / (1 - p_m[0, 1])]
    )
    torch.testing.assert_close(logits.grad[0], expected)


def _infonce_loop(img, txt, labels, tau):
    per_image = []
    for i in range(img.shape[0]):
        positives = [c for c in range(txt.shape[0]) if labels[i, c] == 1]
        if not positives:
            continue
        sims = [float(img[i] @ txt[c]) / tau for c in range(txt.shape[0])]
        log_z = math.log(sum(math.exp(s) for s in sims))
        per_image.append(-sum(sims[c] - log_z for c in positives) / len(positives))
    return sum(per_image) / len(per_image)


def test_multi_positive_infonce_equals_loop_formula_and_skips_images_without_positives():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 1]])
    loss = multi_positive_infonce(img, txt, labels, tau=0.07)
    assert loss.item() == pytest.approx(_infonce_loop(img, txt, labels, 0.07), rel=1e-10)


def test_multi_positive_infonce_is_zero_with_gradient_when_no_image_has_a_positive():
    img = F.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(3, 4), dim=1)
    loss = multi_positive_infonce(img, txt, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(img.grad == 0)


def _ranking_loop(scores, labels, mask, margin):
    per_image = []
    for i in range(scores.shape[0]):
        pos = [c for c in range(scores.shape[1]) if labels[i, c] == 1 and mask[i, c] == 1]
        neg = [c for c in range(scores.shape[1]) if labels[i, c] == 0 and mask[i, c] == 1]
        if not pos:
            continue
        total, violations = 0.0, 0
        for p in pos:
            for n in neg:
                h = max(0.0, margin - float(scores[i, p]) + float(scores[i, n]))
                total += h
                violations += h > 0
        per_image.append(total / max(violations, 1))
    return sum(per_image) / len(per_image)


def test_ranking_loss_equals_loop_formula_over_known_pairs():
    scores = torch.tensor(
        [[0.9, 0.2, 0.5, -0.3], [0.1, 0.4, 2.5, 0.0], [0.3, 0.3, 0.3, 0.3], [1.0, 5.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]])
    loss = ranking_loss(scores, labels, margin=1.0, mask=mask)
    assert loss.item() == pytest.approx(_ranking_loop(scores, labels, mask, 1.0), rel=1e-12)
    unmasked = ranking_loss(scores, labels, margin=1.0)
    assert unmasked.item() == pytest.approx(_ranking_loop(scores, labels, torch.ones_like(mask), 1.0))
    assert unmasked.item() != pytest.approx(loss.item())


def test_ranking_loss_is_zero_when_every_margin_is_satisfied():
    scores = torch.tensor([[2.0, 0.5, 2.2, -1.0]], requires_grad=True)
    labels = torch.tensor([[1, 0, 1, 0]])
    loss = ranking_loss(scores, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(scores.grad == 0)
    assert ranking_loss(scores, labels, margin=2.0).item() > 0


def test_distillation_l1_is_mean_absolute_difference_and_does_not_train_teacher():
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 2.0], [1.0, 1.0]], requires_grad=True)
    loss = distillation_l1(student, teacher)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 + 0 + 1 + 2) / 4)
    assert teacher.grad is None


def test_losses_are_registered_by_name():
    assert get_loss("mumic_bce") is tempered_sigmoid_bce
    assert LOSSES["asl"] is asymmetric_loss and LOSSES["ranking"] is ranking_loss
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")
