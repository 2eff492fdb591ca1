"""The CLIP-Decoder head (methods.md §3): ML-Decoder's query decoder over the ViT patch tokens, with one
query per class made from its CLIP text embedding (so any label, seen in training or not, gets a query),
a class-agnostic output, and an aligned image embedding e in the text space.

Follows ML-Decoder's code (Alibaba-MIIL/ML_Decoder, `TransformerDecoderLayerOptimal` and the `zsl` branch of
`MLDecoder`): no self-attention, post-norm, dropout 0.1, a shared `duplicate_pooling` vector [d, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..head_options import ClipDecoderOptions
from ..losses import clip_decoder_loss
from .base import Head, ImageFeatures, Objective


class DecoderLayer(nn.Module):
    """q ← LN(q + Dropout(q)); q ← LN(q + MHA(q, X, X)); q ← LN(q + FFN(q))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.dropout, self.dropout1 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        """queries [B, C, d], memory [B, N, d] → [B, C, d]."""
        q = self.norm1(queries + self.dropout1(queries))
        attended = self.cross_attn(q, memory, memory, need_weights=False)[0]
        q = self.norm2(q + self.dropout2(attended))
        q = self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))
        return q


class ClipDecoderHead(Head):
    name = "clip_decoder"
    Options = ClipDecoderOptions
    tokens = "width"

    def __init__(self, options: ClipDecoderOptions, clip: nn.Module, tokenizer: Any, config: Any):
        super().__init__(options)
        proj = clip.visual.proj  # [W, D]
        width, embed = proj.shape
        d = options.dim
        self.embed_tokens = nn.Linear(width, d)  # patch tokens → d, then ReLU
        self.query = nn.Linear(embed, d)  # q_c = ReLU(Linear(t_c))
        self.decoder = DecoderLayer(d, options.heads, options.ffn, options.dropout)
        # ML-Decoder's zsl output: one [d, 1] vector shared by every class (xavier normal) and a scalar bias
        self.out_weight = nn.Parameter(nn.init.xavier_normal_(torch.empty(d, 1)).squeeze(1))
        self.out_bias = nn.Parameter(torch.zeros(()))
        # e = normalize(Linear(mean of the patch tokens)), starting as CLIP's own projection of them, so e
        # starts close to the text space it is then aligned with
        self.align = nn.Linear(width, embed)
        with torch.no_grad():
            self.align.weight.copy_(proj.detach().t())
            self.align.bias.zero_()

    def forward(self, features: ImageFeatures, class_emb: Tensor) -> dict[str, Tensor]:
        tokens = features.tokens  # [B, N, W]
        memory = F.relu(self.embed_tokens(tokens))  # [B, N, d]
        queries = F.relu(self.query(class_emb))  # [C, d]
        b, c = tokens.shape[0], queries.shape[0]
        h = self.decoder(queries.unsqueeze(0).expand(b, c, -1), memory)  # [B, C, d]
        logits = h @ self.out_weight + self.out_bias  # [B, C] class-agnostic w·h_c + b
        img_emb = F.normalize(self.align(tokens.mean(dim=1)), dim=-1)  # [B, D] e
        return {"img_emb": img_emb, "logits": logits, "probs": torch.sigmoid(logits), "class_emb": class_emb}

    @property
    def tau(self) -> float:
        return self.options.tau

    def set_trainable(self, model: Any, mode: str, stage: int) -> None:
        super().set_trainable(model, mode, stage)
        # DDP (find_unused_parameters off) needs every trainable parameter used: this head reads the patch
        # tokens, never the pooled projection (its `align` started from it), and α = 0 leaves e without loss
        model.clip.visual.proj.requires_grad_(False)
        self.align.requires_grad_(self.options.alpha > 0)

    def objective(self, model: Any, stage: int, cfg: Any, class_weights: Tensor | None = None) -> Objective:
        return DecoderObjective(alpha=self.options.alpha, beta=self.options.beta, tau=self.options.tau)


@dataclass
class DecoderObjective(Objective):
    alpha: float = 1.0
    beta: float = 1.0
    tau: float = 0.07

    def __call__(self, out: dict[str, Tensor], labels: Tensor, mask: Tensor | None, pixels: Tensor) -> Tensor:
        y = labels.to(out["logits"].dtype)
        loss, parts = clip_decoder_loss(
            out["logits"], out["img_emb"], out["class_emb"], y, mask, self.alpha, self.beta, self.tau
        )
        self.terms = {k: v.detach() for k, v in parts.items()}
        return loss
