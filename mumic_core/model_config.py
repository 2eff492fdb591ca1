"""A model's hyper-parameters (`ModelConfig`, saved whole in config.json), their bounds, the error for
anything a user can fix (`ModelError`) and the precision rule (`resolve`): all without torch, so that a
process that only reads and checks saved configs and plans a run (a retag driver, `mumic runs`, `mumic
vacuum`) never imports it (1.5 s of CPU and ~250 MB). `mumic_core.model` builds models from these and
re-exports `ModelConfig`, `ModelError`, `check_arch` and `TRAIN_MODES`; `mumic_core.precision` applies the
rule and re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .head_options import HEAD_NAMES, options_for
from .images import OPENAI_MEAN, OPENAI_STD, RESIZE_MODES

TRAIN_MODES = ("both", "image", "frozen")

# Generous bounds on an open_clip architecture, checked before anything is allocated. The largest CLIPs
# (ViT-bigG-14: width 1664, 48 layers, embed 1280; SigLIP so400m at 384 px; 77..256 text tokens) are far
# inside them; a config beyond them is a typo or a hostile file, and would only exhaust memory.
ARCH_LIMITS: dict[str, int] = {
    "embed_dim": 16_384,
    "width": 16_384,
    "head_width": 16_384,
    "heads": 1_024,
    "layers": 256,
    "mlp_ratio": 64,
    "patch_size": 1_024,
    "image_size": 4_096,
    "context_length": 8_192,
    "vocab_size": 1_048_576,
    "attn_pooler_queries": 4_096,
    "attn_pooler_heads": 1_024,
}
# A rough count from the sizes (_rough_parameters): open_clip's largest, ViT-e-14, comes to ~4.6e9.
MAX_PARAMETERS = 10_000_000_000


class ModelError(ValueError):
    """A user-fixable problem with a backbone name, a pretrained reference or a saved model."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a model version; saved whole in config.json and logged to MLflow."""

    backbone: str = "ViT-B-32"  # open_clip model name, or a path/URI of an architecture JSON
    pretrained: str | None = None  # open_clip tag, local/S3 checkpoint file, or None (random init)
    head: str = "mumic"  # a name in mumic_core.heads.HEADS
    head_options: Any = field(default_factory=dict)  # the head's options dataclass (a mapping when given)
    learn_tau: bool = True
    init_tau: float | None = None  # None: 1 / exp(logit_scale) of the backbone checkpoint
    use_bias: bool = True
    init_bias: float = 0.0
    train_mode: str = "both"  # both | image (text frozen, embeddings cached) | frozen (only tau, bias)
    arch: dict[str, Any] = field(default_factory=dict)  # resolved open_clip architecture (filled in)
    image_size: int = 0  # filled in from the architecture
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.head not in HEAD_NAMES:
            raise ModelError(f"unknown head {self.head!r}; known: {', '.join(HEAD_NAMES)}")
        try:
            self.head_options = options_for(self.head, self.head_options)
        except ValueError as e:
            raise ModelError(f"head {self.head}: {e}") from None
        if self.train_mode not in TRAIN_MODES:
            raise ModelError(f"unknown train_mode {self.train_mode!r}; known: {', '.join(TRAIN_MODES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ModelError(f"unknown resize_mode {self.resize_mode!r}; known: {', '.join(RESIZE_MODES)}")
        self.mean = _three_floats("mean", self.mean)
        self.std = _three_floats("std", self.std)
        if min(self.std) <= 0:
            raise ModelError(f"std must be positive, got {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A saved config back; unknown fields are refused by name (a newer or a tampered file), and the
        architecture is bounded (check_arch) before any layer exists."""
        if not isinstance(d, dict):
            raise ModelError(f"a model config is a JSON object, not {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ModelError(f"unknown model field(s) {_listed(unknown)}; known: {', '.join(known)}")
        if not isinstance(d.get("arch", {}), dict):
            raise ModelError(f"model.arch must be an object, not {type(d['arch']).__name__}")
        if d.get("arch"):
            check_arch(d["arch"], "model.arch")
        try:
            return cls(**d)
        except ModelError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a field of the wrong type
            raise ModelError(f"model config not understood: {type(e).__name__}: {e}") from None


def _three_floats(name: str, values: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ModelError(f"{name} must be 3 numbers (R, G, B), got {values!r:.80}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ModelError(f"{name} must be 3 finite numbers (R, G, B), got {list(out)!r:.80}")
    return out  # type: ignore[return-value]


def _listed(names: Sequence[Any], at_most: int = 8) -> str:
    """Offending names for a one-line message: repr'd, each cut to 40 characters, at most `at_most`."""
    shown = [repr(str(n)[:40]) for n in list(names)[:at_most]]
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(shown) + more


def _sizes(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def check_arch(arch: Any, source: str = "architecture") -> None:
    """Refuse an open_clip architecture whose sizes are out of bounds (ARCH_LIMITS, MAX_PARAMETERS) or not
    positive numbers, in one line naming the field; nothing is allocated before this passes."""
    if not isinstance(arch, dict):
        raise ModelError(f"{source}: an architecture is a JSON object, not {type(arch).__name__}")
    parts = {"": arch}
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(arch.get(tower), dict):
            raise ModelError(f"{source}: an architecture needs '{tower}' as an object")
        parts[f"{tower}."] = arch[tower]
    for prefix, cfg in parts.items():
        for key, limit in ARCH_LIMITS.items():
            for v in _sizes(cfg.get(key)):
                if v is None:  # absent, or open_clip's "not used" (ResNet towers have no patch_size)
                    continue
                number = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                if not number or not 0 < v <= limit or (key != "mlp_ratio" and v != int(v)):
                    raise ModelError(f"{source}: {prefix}{key} = {v!r:.40} is outside 1..{limit}")
    n = _rough_parameters(arch)
    if n > MAX_PARAMETERS:
        raise ModelError(f"{source}: about {n:.2e} parameters, above the limit {MAX_PARAMETERS:.0e}")


def _rough_parameters(arch: dict[str, Any]) -> float:
    """Transformer blocks (~(4 + 2*mlp_ratio) * width^2 each), token/position embeddings, patch stem."""
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    total = 0.0
    for tower, width in ((vision, _size(vision, "width", 768)), (text, _size(text, "width", 512))):
        blocks = sum(float(v) for v in _sizes(tower.get("layers") or 12))
        total += blocks * (4 + 2 * _size(tower, "mlp_ratio", 4)) * width * width
    patch = _size(vision, "patch_size", 16)
    tokens = (_size(vision, "image_size", 224) / patch) ** 2
    total += (tokens + 3 * patch * patch) * _size(vision, "width", 768)
    text_tokens = _size(text, "vocab_size", 49408) + _size(text, "context_length", 77)
    total += text_tokens * _size(text, "width", 512)
    return total


def _size(cfg: dict[str, Any], key: str, default: float) -> float:
    return max((float(v) for v in _sizes(cfg.get(key)) if v is not None), default=float(default))


# ---- precision: the rule every scoring path resolves (`mumic_core.precision` applies it) ------------------

# The commands' option types spell these out again (`mumic --help` imports no torch); a test keeps them equal.
Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")


def resolve(precision: str | None, device: Any) -> str:
    """'auto' (or None) made concrete for `device` (a torch.device, or its name: "cuda", "cuda:1", "cpu"),
    and a combination that cannot work refused. Decided from the device type alone, without torch."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        # decided from the device type alone, so a driver without a GPU resolves it as its actors will;
        # on a GPU without native bf16 (before Ampere: V100, T4) ask for fp32
        return "bf16" if kind == "cuda" else "fp32"
    if precision == "int8" and kind != "cpu":
        raise ModelError(f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}; use bf16")
    return precision
