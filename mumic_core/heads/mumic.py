"""The MuMIC head (methods.md §1): cosine similarity to each class embedding through a tempered sigmoid,
p = σ(v·t / τ + b), trained with the hardness-aware tempered-sigmoid BCE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..head_options import MumicOptions
from ..losses import tempered_sigmoid_bce
from .base import Head, ImageFeatures, LrGroup, Objective

TAU_RANGE = (1e-3, 1.0)  # kept after every step: too small saturates, too large never separates


class TemperedSigmoidHead(Head):
    name = "mumic"
    Options = MumicOptions

    def __init__(self, options: MumicOptions, clip: nn.Module, tokenizer: Any, config: Any):
        super().__init__(options)
        init_tau = config.init_tau
        if init_tau is None:  # the backbone's own temperature (≈ 0.01 for a pretrained CLIP)
            init_tau = 1.0 / float(clip.logit_scale.detach().exp())
        self.learn_tau, self.use_bias = bool(config.learn_tau), bool(config.use_bias)
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau)), requires_grad=self.learn_tau)
        self.bias = nn.Parameter(torch.tensor(float(config.init_bias)), requires_grad=self.use_bias)

    def forward(self, features: ImageFeatures, class_emb: Tensor) -> dict[str, Tensor]:
        img_emb = F.normalize(features.pooled, dim=-1)  # [B, D]
        sim = img_emb @ class_emb.t()  # [B, C] cosine
        logits = sim / self.log_tau.exp() + self.bias  # [B, C]
        return {"img_emb": img_emb, "sim": sim, "logits": logits, "probs": torch.sigmoid(logits)}

    @property
    def tau(self) -> float:
        return float(self.log_tau.detach().exp())

    def summary(self) -> dict[str, float]:
        return {"tau": self.tau, "bias": float(self.bias.detach())}

    def set_trainable(self, model: Any, mode: str, stage: int) -> None:
        super().set_trainable(model, mode, stage)
        self.log_tau.requires_grad_(self.learn_tau)
        self.bias.requires_grad_(self.use_bias)

    def lr_groups(self, model: Any, cfg: Any, stage: int) -> list[LrGroup]:
        return [
            LrGroup("image", model.image_parameters(), cfg.lr_image),
            LrGroup("text", model.text_parameters(), cfg.lr_text),
            LrGroup("head", [self.log_tau, self.bias], cfg.lr_head, decay=False),
        ]

    def objective(self, model: Any, stage: int, cfg: Any, class_weights: Tensor | None = None) -> Objective:
        return TemperedBCE(
            head=self, weighting=cfg.loss_weighting, gamma=cfg.focal_gamma, class_weights=class_weights
        )

    def after_step(self) -> None:
        with torch.no_grad():
            self.log_tau.clamp_(math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1]))


@dataclass
class TemperedBCE(Objective):
    head: TemperedSigmoidHead | None = None
    weighting: str = "none"
    gamma: float = 2.0
    class_weights: Tensor | None = None

    def __call__(self, out: dict[str, Tensor], labels: Tensor, mask: Tensor | None, pixels: Tensor) -> Tensor:
        head = self.head
        return tempered_sigmoid_bce(
            out["sim"],
            labels.to(out["sim"].dtype),
            head.log_tau,
            bias=head.bias if head.use_bias else None,
            mask=mask,
            weighting=self.weighting,
            gamma=self.gamma,
            class_weights=self.class_weights,
        )
