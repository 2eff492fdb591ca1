"""The MKT head (methods.md §2): two streams of label scores from one ViT, a global one from the CLS
embedding and a local one from the best-matching patches, both in CLIP's text space; trained in two stages.

Follows the official code (sunanhe/MKT: `models/clip_vit.py`, `models/rank_loss.py`, `utils/lr_decay.py`,
`engine_nus_first_stage.py`, `engine_nus_second_stage.py`):
  stage 1: ranking loss + L1 distillation of the CLS embedding against a frozen copy of the starting image
           tower; only the last two blocks, ln_post and the projection train, with layer-wise LR decay;
  stage 2: prompt tuning: everything frozen but the template's context-word embeddings; ranking loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..head_options import MKTOptions
from ..losses import mkt_loss
from .base import Head, ImageFeatures, LrGroup, Objective, frozen_copy
from .prompts import PromptContext


def mkt_scores(cls_emb: Tensor, patch_emb: Tensor, class_emb: Tensor, top_k: int) -> Tensor:
    """s = (ŝ_loc + ŝ_glo) / 2 in [-1, 1]: ŝ the L2-normalised (over labels) scores of
    global s_glo[c] = o_cls · t_c and local s_loc[c] = mean of the top-k patch scores o_i · t_c.

    cls_emb [B, D], patch_emb [B, N, D] (projected, not normalised, as MKT), class_emb [C, D] → [B, C].
    """
    per_patch = patch_emb @ class_emb.t()  # [B, N, C]
    k = min(top_k, per_patch.shape[1])
    local = per_patch.topk(k, dim=1).values.mean(dim=1)  # [B, C]
    glob = cls_emb @ class_emb.t()  # [B, C]
    return (F.normalize(local, dim=-1) + F.normalize(glob, dim=-1)) / 2


class MKTHead(Head):
    name = "mkt"
    Options = MKTOptions
    tokens = "embed"
    stages = (1, 2)
    stateful_objective = True  # stage 1's teacher is the image tower as the stage began

    def __init__(self, options: MKTOptions, clip: nn.Module, tokenizer: Any, config: Any):
        super().__init__(options)
        self.prompt = PromptContext(clip, tokenizer, options.template)

    def forward(self, features: ImageFeatures, class_emb: Tensor) -> dict[str, Tensor]:
        scores = mkt_scores(features.pooled, features.tokens, class_emb, self.options.top_k)  # [B, C]
        return {
            "img_emb": F.normalize(features.pooled, dim=-1),  # [B, D] the CLS embedding, in CLIP's text space
            "scores": scores,
            "probs": (scores + 1) / 2,  # [-1, 1] mapped onto [0, 1], monotone: ranks and APs unchanged
            "cls": features.pooled,  # what stage 1 distils
        }

    def encode_classes(self, model: Any, taxonomy: Any) -> Tensor:
        if self.options.prompt_tuned:
            return self.prompt.encode(model.clip, taxonomy.names)
        return model.prompt_embeddings(taxonomy)

    def text_parameters(self) -> list[nn.Parameter]:
        return [self.prompt.context]

    # ---- training ----
    def begin_stage(self, model: Any, stage: int) -> None:
        if stage == 2:
            self.options.prompt_tuned = True  # saved with the model: it now scores through the template

    def set_trainable(self, model: Any, mode: str, stage: int) -> None:
        """The stage decides (`mode` does not apply): stage 1 the top of the image tower, stage 2 the
        prompt's context words."""
        model.requires_grad_(False)
        if stage == 2:
            self.prompt.context.requires_grad_(True)
            return
        for module in self._top_of_image_tower(model):
            module.requires_grad_(True)
        model.clip.visual.proj.requires_grad_(True)

    def _top_of_image_tower(self, model: Any) -> list[nn.Module]:
        visual = model.clip.visual
        blocks = list(visual.transformer.resblocks)
        return [*blocks[max(0, len(blocks) - self.options.train_blocks) :], visual.ln_post]

    def lr_groups(self, model: Any, cfg: Any, stage: int) -> list[LrGroup]:
        if stage == 2:
            return [LrGroup("prompt", [self.prompt.context], cfg.lr_text)]
        visual = model.clip.visual
        blocks = list(visual.transformer.resblocks)
        n = len(blocks)
        groups = [
            LrGroup(
                f"block{i}", list(blocks[i].parameters()), cfg.lr_image * self.options.layer_decay ** (n - i)
            )
            for i in range(max(0, n - self.options.train_blocks), n)
        ]
        groups.append(LrGroup("post", [*visual.ln_post.parameters(), visual.proj], cfg.lr_image))
        return groups

    def objective(self, model: Any, stage: int, cfg: Any, class_weights: Tensor | None = None) -> Objective:
        teacher = frozen_copy(model.clip.visual) if stage == 1 else None
        return RankObjective(
            model=model,
            teacher=teacher,
            distill_weight=self.options.distill_weight,
            margin=self.options.margin,
        )


@dataclass
class RankObjective(Objective):
    model: Any = None
    teacher: nn.Module | None = None  # stage 1: the starting image tower, frozen, outside the model
    distill_weight: float = 1.0
    margin: float = 1.0

    def __call__(self, out: dict[str, Tensor], labels: Tensor, mask: Tensor | None, pixels: Tensor) -> Tensor:
        target = None
        if self.teacher is not None:
            with torch.no_grad():
                target = _pooled(self.teacher(self.model.prepare_pixels(pixels))).float()  # [B, D]
        loss, parts = mkt_loss(
            out["scores"], labels, mask, out["cls"], target, self.distill_weight, self.margin
        )
        self.terms = {k: v.detach() for k, v in parts.items()}
        return loss


def _pooled(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out
