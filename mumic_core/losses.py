"""Training losses of the three heads: MuMIC's tempered-sigmoid BCE, CLIP-Decoder's ASL and multi-positive
InfoNCE, MKT's ranking and distillation losses. Pure torch; multi-label losses take an optional known-label mask."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTINGS = ("none", "focal", "asymmetric", "class_frequency")


def _known_mask(labels: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """1 where the label is known, 0 where it must be ignored; [B, C] in `dtype`."""
    if mask is None:
        return torch.ones(labels.shape, dtype=dtype, device=labels.device)
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from labels shape {tuple(labels.shape)}")
    return mask.to(dtype)


def _masked_mean(per_entry: Tensor, m: Tensor) -> Tensor:
    """Sum of known entries over their count; `where` keeps unknown entries out even if they are inf."""
    known = torch.where(m > 0, per_entry * m, torch.zeros_like(per_entry))  # [B, C]
    return known.sum() / m.sum().clamp(min=1)


def _asl_terms(
    logits: Tensor,
    y: Tensor,
    gamma_pos: float,
    gamma_neg: float,
    clip: float,
    eps: float,
    detach_weight: bool,
) -> Tensor:
    """Per-entry ASL loss (non-negative), [B, C]; logs come from logsigmoid so tiny τ cannot underflow them."""
    p = torch.sigmoid(logits)  # [B, C]
    one_minus_p = torch.sigmoid(-logits)  # [B, C], exact even where p rounds to 1
    log_p = F.logsigmoid(logits)
    if clip > 0:
        # 1 - p_m = 1 - max(p - clip, 0) = min(1 - p + clip, 1)
        log_one_minus_pm = torch.log((one_minus_p + clip).clamp(max=1.0))
    else:
        log_one_minus_pm = F.logsigmoid(-logits)
    if eps > 0:  # the official ASL floors probabilities at eps inside the logs
        log_p = log_p.clamp(min=math.log(eps))
        log_one_minus_pm = log_one_minus_pm.clamp(min=math.log(eps))
    w_pos = one_minus_p.pow(gamma_pos)  # [B, C]
    w_neg = (p - clip).clamp(min=0).pow(gamma_neg)  # [B, C], p_m ** gamma_neg
    if detach_weight:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    return -(y * w_pos * log_p + (1 - y) * w_neg * log_one_minus_pm)


def tempered_sigmoid_bce(
    sim: Tensor,
    labels: Tensor,
    log_tau: Tensor | float,
    bias: Tensor | float | None = None,
    mask: Tensor | None = None,
    weighting: str = "none",
    gamma: float = 2.0,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    class_weights: Tensor | None = None,
    detach_weight: bool = True,
) -> Tensor:
    """MuMIC's hardness-aware BCE on p = σ(sim / exp(log_tau) + bias), averaged over known entries.

    weighting: none | focal ((1 - p_t)^gamma) | asymmetric (ASL with gamma_pos, gamma_neg, clip) |
    class_frequency (needs class_weights [C]). class_weights, when given, multiply in under any weighting.
    detach_weight=True treats the focal/ASL focusing weight as a constant, as the official ASL does.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if weighting == "class_frequency" and class_weights is None:
        raise ValueError("weighting='class_frequency' needs class_weights (see class_frequency_weights)")
    log_tau = torch.as_tensor(log_tau, dtype=sim.dtype, device=sim.device)
    logits = sim / log_tau.exp()  # [B, C]
    if bias is not None:
        logits = logits + bias
    y = labels.to(logits.dtype)  # [B, C]
    m = _known_mask(labels, mask, logits.dtype)  # [B, C]

    if weighting == "asymmetric":
        per_entry = _asl_terms(logits, y, gamma_pos, gamma_neg, clip, eps=0.0, detach_weight=detach_weight)
    else:
        per_entry = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # [B, C]
        if weighting == "focal":
            one_minus_pt = y * torch.sigmoid(-logits) + (1 - y) * torch.sigmoid(logits)  # [B, C]
            w = one_minus_pt.pow(gamma)
            per_entry = per_entry * (w.detach() if detach_weight else w)
    if class_weights is not None:
        per_entry = per_entry * class_weights.to(per_entry)  # [C] broadcast over the batch
    return _masked_mean(per_entry, m)


def class_frequency_weights(label_matrix: Tensor, mask: Tensor | None = None, power: float = 1.0) -> Tensor:
    """Per-class weights [C] ∝ (known / positives)^power over a label matrix [N, C], normalised to mean 1.

    A class with no known positive counts as having one, so its weight stays finite (the largest).
    power=0.5 gives the milder square-root weighting.
    """
    y = label_matrix.float() if not label_matrix.is_floating_point() else label_matrix
    m = _known_mask(label_matrix, mask, y.dtype)  # [N, C]
    positives = (y * m).sum(dim=0).clamp(min=1)  # [C]
    known = m.sum(dim=0).clamp(min=1)  # [C]
    w = (known / positives).pow(power)  # [C]
    return w / w.mean()


def asymmetric_loss(
    logits: Tensor,
    labels: Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    reduction: str = "sum",
    detach_weight: bool = True,
) -> Tensor:
    """ASL (CLIP-Decoder's L_cls): −Σ y(1−p)^γ+ log p + (1−y) p_m^γ− log(1−p_m), p_m = max(p − clip, 0).

    reduction: "sum" (as ML-Decoder) or "mean" over known entries. eps floors the probabilities inside the
    logs like the official ASL (0 disables).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")
    y = labels.to(logits.dtype)  # [B, C]
    m = _known_mask(labels, mask, logits.dtype)  # [B, C]
    per_entry = _asl_terms(logits, y, gamma_pos, gamma_neg, clip, eps, detach_weight)  # [B, C]
    if reduction == "mean":
        return _masked_mean(per_entry, m)
    return torch.where(m > 0, per_entry * m, torch.zeros_like(per_entry)).sum()


def multi_positive_infonce(
    img_emb: Tensor, text_emb: Tensor, labels: Tensor, tau: Tensor | float = 0.07, mask: Tensor | None = None
) -> Tensor:
    """CLIP-Decoder's L_clip: per image −mean_{c ∈ P_i} log softmax_c(e·t/τ), averaged over images with a positive.

    img_emb [B, D] and text_emb [C, D] are expected to be L2-normalised already. Classes whose label is
    unknown for an image (mask 0: e.g. unseen labels) are left out of that image's softmax, so they are
    neither positives nor negatives.
    """
    logits = img_emb @ text_emb.t() / tau  # [B, C]
    if mask is not None:
        m = _known_mask(labels, mask, logits.dtype)  # [B, C]
        logits = logits.masked_fill(m == 0, float("-inf"))
        labels = labels * m.to(labels.dtype)
    log_prob = logits.log_softmax(dim=1)  # [B, C]; -inf where unknown
    log_prob = torch.where(torch.isfinite(log_prob), log_prob, torch.zeros_like(log_prob))
    y = labels.to(logits.dtype)  # [B, C]
    n_pos = y.sum(dim=1)  # [B]
    per_image = -(y * log_prob).sum(dim=1) / n_pos.clamp(min=1)  # [B]
    has_pos = n_pos > 0  # [B]
    return per_image[has_pos].sum() / has_pos.sum().clamp(min=1)


def ranking_loss(scores: Tensor, labels: Tensor, margin: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """MKT's L_rank: per image Σ max(0, margin − s_pos + s_neg) over (pos, neg) pairs / #violating pairs.

    Averaged over images with a known positive, as MKT's training loop drops the others. Builds a
    [B, C, C] pair tensor, like the official code.
    """
    y = labels.to(scores.dtype)  # [B, C]
    m = _known_mask(labels, mask, scores.dtype)  # [B, C]
    pos = y * m  # [B, C]
    neg = (1 - y) * m  # [B, C]
    pairs = pos[:, :, None] * neg[:, None, :]  # [B, C_pos, C_neg]
    hinge = (margin - scores[:, :, None] + scores[:, None, :]).clamp(min=0) * pairs  # [B, C, C]
    violations = (hinge > 0).sum(dim=(1, 2))  # [B]
    per_image = hinge.sum(dim=(1, 2)) / violations.clamp(min=1)  # [B]
    has_pos = pos.sum(dim=1) > 0  # [B]
    return per_image[has_pos].sum() / has_pos.sum().clamp(min=1)


def distillation_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """MKT's L_dist: mean absolute difference between student and (frozen) teacher embeddings [B, D]."""
    return F.l1_loss(student, teacher.detach())


def clip_decoder_loss(
    logits: Tensor,
    img_emb: Tensor,
    text_emb: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    tau: float = 0.07,
    detach_weight: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CLIP-Decoder's L = α·L_clip(e, t) + β·ASL(logits) (ASL: γ+ = 0, γ− = 4, clip 0.05, summed as in
    ML-Decoder); returns (L, {"clip": L_clip, "asl": ASL})."""
    l_clip = multi_positive_infonce(img_emb, text_emb, labels, tau, mask=mask)
    l_cls = asymmetric_loss(logits, labels, mask=mask, detach_weight=detach_weight)
    return alpha * l_clip + beta * l_cls, {"clip": l_clip, "asl": l_cls}


def mkt_loss(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    student: Tensor | None = None,
    teacher: Tensor | None = None,
    distill_weight: float = 1.0,
    margin: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MKT: L_rank(scores), plus distill_weight · L_dist(student, teacher) when a teacher is given (stage 1);
    returns (L, {"rank": ..., "distill": ...})."""
    rank = ranking_loss(scores, labels, margin=margin, mask=mask)
    if teacher is None:
        return rank, {"rank": rank}
    dist = distillation_l1(student, teacher)
    return rank + distill_weight * dist, {"rank": rank, "distill": dist}


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mumic_bce": tempered_sigmoid_bce,
    "asl": asymmetric_loss,
    "infonce": multi_positive_infonce,
    "ranking": ranking_loss,
    "l1_distill": distillation_l1,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under `name`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]
