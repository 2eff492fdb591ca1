"""The head registry: a model's head is chosen by name (`ModelConfig.head`, `mumic train --head`), its
options are a dataclass saved with the model, and it is built here, in one place.

    mumic         tempered sigmoid over cosine similarities (methods.md §1)
    mkt           global + top-k local scores, ranking loss, two stages (methods.md §2)
    clip_decoder  ML-Decoder queries from class text embeddings, ASL + CLIP alignment (methods.md §3)

Consumers (scoring, training, checkpoints) use the `Head` interface and never the name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..head_options import (
    HEAD_NAMES,
    HEAD_OPTIONS,
    ClipDecoderOptions,
    HeadOptions,
    MKTOptions,
    MumicOptions,
    options_for,
)
from .base import Head, ImageFeatures, LrGroup, Objective, no_autocast
from .clip_decoder import ClipDecoderHead
from .mkt import MKTHead
from .mkt import mkt_scores as mkt_scores
from .mumic import TemperedSigmoidHead

HEADS: dict[str, type[Head]] = {h.name: h for h in (TemperedSigmoidHead, ClipDecoderHead, MKTHead)}
# the torch-free registry of options (what a saved config is checked against) names the same heads
if {name: h.Options for name, h in HEADS.items()} != HEAD_OPTIONS or tuple(HEADS) != HEAD_NAMES:
    raise ImportError("mumic_core.head_options.HEAD_OPTIONS and mumic_core.heads.HEADS disagree")


def head_class(name: str) -> type[Head]:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(HEADS)}")
    return HEADS[name]


def build_head(config: Any, clip: nn.Module, tokenizer: Any) -> Head:
    """The head of a model config (its `head` and `head_options`), sized for `clip`."""
    cls = head_class(config.head)
    if cls.tokens is not None:
        _check_token_tower(cls.name, clip.visual)
    return cls(config.head_options, clip, tokenizer, config)


def _check_token_tower(name: str, visual: nn.Module) -> None:
    """Heads that read patch tokens need open_clip's ViT with a class token and ln_post on every token."""
    plain_vit = (
        hasattr(visual, "output_tokens")
        and getattr(visual, "attn_pool", None) is None
        and not getattr(visual, "final_ln_after_pool", False)
        and getattr(visual, "pool_type", "tok") == "tok"
        and getattr(visual, "proj", None) is not None
    )
    if not plain_vit:
        raise ValueError(f"head {name} needs a ViT image tower with a class token and a projection")


__all__ = [
    "HEADS",
    "HEAD_NAMES",
    "ClipDecoderOptions",
    "Head",
    "HeadOptions",
    "ImageFeatures",
    "LrGroup",
    "MKTOptions",
    "MumicOptions",
    "Objective",
    "build_head",
    "head_class",
    "mkt_scores",
    "no_autocast",
    "options_for",
]
