"""What every head is: options saved with the model, the image features it asks the backbone for, its
scores and embedding for given class text embeddings, what trains in each stage, and its loss. The
options classes live in `mumic_core.head_options`, which imports no torch.

Heads know nothing of `mumic_core.model` (which builds them): the model is passed in where a head needs
it (its towers' parameters, its prompt embeddings), so the import runs one way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..head_options import HeadOptions

__all__ = ["Head", "HeadOptions", "ImageFeatures", "LrGroup", "Objective", "frozen_copy", "no_autocast"]


@dataclass
class ImageFeatures:
    """What the backbone gives a head, under the backbone's precision (the head casts to fp32).

    pooled: [B, D] the image tower's projected output (a ViT's CLS token), not normalised.
    tokens: [B, N, W] the patch tokens after ln_post ("width"), or [B, N, D] those projected by the CLIP
            projection ("embed"), when the head asks for them (`Head.tokens`); else None.
    """

    pooled: Tensor
    tokens: Tensor | None = None

    def float(self) -> ImageFeatures:
        return ImageFeatures(self.pooled.float(), None if self.tokens is None else self.tokens.float())


@dataclass
class LrGroup:
    """Parameters optimised at one learning rate; `decay=False` exempts the whole group from weight decay
    (matrices of a decayed group get it, 1-d parameters never do)."""

    name: str
    params: list[nn.Parameter]
    lr: float
    decay: bool = True


@dataclass
class Objective:
    """A head's training loss in one stage: `loss(out, labels, mask, pixels)`; `terms` holds the last call's
    terms (detached 0-d tensors on the loss's device, logged per epoch as `loss_<name>`): kept as tensors,
    because reading a number off a GPU waits for it, and the training loop reads them once per epoch."""

    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, float]:
        """The last call's terms as numbers (a device sync: not for every step)."""
        return {k: float(v) for k, v in self.terms.items()}

    def __call__(self, out: dict[str, Tensor], labels: Tensor, mask: Tensor | None, pixels: Tensor) -> Tensor:
        raise NotImplementedError


class Head(nn.Module):
    """Scores [B, C] and the embedding [B, D] from image features and class text embeddings [C, D].

    `forward(features, class_emb)` runs in fp32 and returns at least `img_emb` (L2-normalised, in the text
    tower's space: search embeds queries with the same text tower) and `probs` (in [0, 1], what thresholds
    apply to), plus whatever its objective reads.
    """

    name: ClassVar[str]
    Options: ClassVar[type[HeadOptions]] = HeadOptions
    tokens: ClassVar[str | None] = None  # None | "width" | "embed": see ImageFeatures
    stages: ClassVar[tuple[int, ...]] = (1,)  # training stages, in order (`mumic train --stage`)
    stateful_objective: ClassVar[bool] = False  # its objective holds state (a teacher): build it once

    def __init__(self, options: HeadOptions):
        super().__init__()
        self.options = options

    # ---- scoring ----
    def encode_classes(self, model: Any, taxonomy: Any) -> Tensor:
        """[C, D] L2-normalised class embeddings; by default the taxonomy's prompts through the text tower."""
        return model.prompt_embeddings(taxonomy)

    def text_parameters(self) -> list[nn.Parameter]:
        """The head's own parameters on the text side (a learned prompt), which class embeddings depend on."""
        return []

    @property
    def tau(self) -> float | None:
        return None

    def summary(self) -> dict[str, float]:
        """Scalars written to config.json beside the weights (`tau`, `bias`), where the head has them."""
        return {}

    # ---- training ----
    def begin_stage(self, model: Any, stage: int) -> None:
        """Called before a stage trains (what trains is then set by `set_trainable`)."""

    def set_trainable(self, model: Any, mode: str, stage: int) -> None:
        """requires_grad for the whole model: the towers by train mode (methods.md §1), the head all."""
        for p in model.image_parameters():
            p.requires_grad_(mode in ("both", "image"))
        for p in model.text_parameters():
            p.requires_grad_(mode == "both")
        for p in self.parameters():
            p.requires_grad_(True)

    def lr_groups(self, model: Any, cfg: Any, stage: int) -> list[LrGroup]:
        """The image tower at lr_image, the text tower at lr_text, this head's parameters at lr_image."""
        return [
            LrGroup("image", model.image_parameters(), cfg.lr_image),
            LrGroup("text", model.text_parameters(), cfg.lr_text),
            LrGroup("head", list(self.parameters()), cfg.lr_image),
        ]

    def objective(self, model: Any, stage: int, cfg: Any, class_weights: Tensor | None = None) -> Objective:
        raise NotImplementedError

    def after_step(self) -> None:
        """After every optimiser step (e.g. keep a temperature in range)."""


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that never trains (a distillation teacher): eval mode, no gradients, not a submodule of
    anything (so neither DDP nor the saved state dict sees it)."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def no_autocast(device: torch.device):
    """The head's maths in fp32 whatever autocast the caller set (thresholds were tuned on fp32 scores)."""
    return torch.autocast(device.type, enabled=False)
