"""MuMIC: an open_clip backbone scored against class text embeddings through a tempered sigmoid.

    img_emb = normalize(f_I(x))                      # [B, D]  (the "domain embedding")
    cls_emb = normalize(mean_k normalize(f_T(p_ck))) # [C, D]  (one per label, from its prompts)
    p       = sigmoid(img_emb @ cls_emb.T / tau + b) # [B, C]

Everything that defines a model version (architecture, taxonomy, tau, bias, thresholds, preprocessing)
lives in `ModelConfig` + the state dict, which `mumic_core.checkpoint` saves as safetensors + JSON.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .images import OPENAI_MEAN, OPENAI_STD
from .taxonomy import Taxonomy

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # registers `mumic-tiny` (and any JSON shipped there)

TRAIN_MODES = ("both", "image", "frozen")
HEADS = ("mumic",)


class ModelError(ValueError):
    """A user-fixable problem with a backbone name, a pretrained reference or a saved model."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a model version; saved whole in config.json and logged to MLflow."""

    backbone: str = "ViT-B-32"  # open_clip model name, or a path/URI of an architecture JSON
    pretrained: str | None = None  # open_clip tag, local/S3 checkpoint file, or None (random init)
    head: str = "mumic"
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
        if self.head not in HEADS:
            raise ModelError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        if self.train_mode not in TRAIN_MODES:
            raise ModelError(f"unknown train_mode {self.train_mode!r}; known: {', '.join(TRAIN_MODES)}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- backbone ---------------------------------------------------------------------------------------


def resolve_arch(backbone: str) -> dict[str, Any]:
    """open_clip architecture dict for a registered name or an architecture JSON file (local or URI)."""
    cfg = open_clip.get_model_config(backbone)
    if cfg is not None:
        return copy.deepcopy(cfg)
    if backbone.endswith(".json"):
        import fsspec

        try:
            with fsspec.open(backbone, "r") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ModelError(f"backbone config not found: {backbone}") from None
        data = data.get("model_cfg", data)
        if "vision_cfg" not in data or "text_cfg" not in data:
            raise ModelError(f"{backbone}: an architecture needs 'vision_cfg' and 'text_cfg'")
        return data
    raise ModelError(f"unknown backbone {backbone!r}: not an open_clip model name nor a .json config")


def build_clip(arch: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip CLIP (random init) from an architecture dict, as open_clip's factory does."""
    cfg = copy.deepcopy(arch)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def build_tokenizer(arch: dict[str, Any]):
    text_cfg = arch.get("text_cfg", {})
    ctx = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=ctx, **text_cfg.get("tokenizer_kwargs", {})
        )
    return open_clip.SimpleTokenizer(context_length=ctx, **text_cfg.get("tokenizer_kwargs", {}))


def _local_copy(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local path for `uri`; remote files (s3://...) are downloaded to a temp dir first."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            raise ModelError(f"pretrained checkpoint not found: {uri}")
        return path, None
    import fsspec

    tmp = tempfile.TemporaryDirectory(prefix="mumic-ckpt-")
    local = os.path.join(tmp.name, os.path.basename(uri.rstrip("/")) or "checkpoint.bin")
    try:
        fsspec.filesystem(uri.split("://")[0]).get(uri, local)
    except FileNotFoundError:
        tmp.cleanup()
        raise ModelError(f"pretrained checkpoint not found: {uri}") from None
    return local, tmp


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a torch file read with weights_only=True (never unpickles
    arbitrary objects; a file that needs that is refused with torch's error)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(ckpt).__name__}")
    return ckpt


def load_pretrained(clip: nn.Module, backbone: str, pretrained: str) -> dict[str, Any]:
    """Load CLIP weights from an open_clip tag (hub download) or a checkpoint file (local or s3://).

    Returns preprocessing overrides (mean/std) that the pretrained weights were trained with.
    Files are read with safetensors or `torch.load(weights_only=True)`: nothing is unpickled.
    """
    tag_cfg = open_clip.get_pretrained_cfg(backbone, pretrained) if "://" not in pretrained else {}
    if tag_cfg:
        path = open_clip.download_pretrained(tag_cfg)  # needs network access to the tag's hub
        open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
        return {k: tuple(tag_cfg[k]) for k in ("mean", "std") if k in tag_cfg}
    looks_like_path = "://" in pretrained or os.sep in pretrained or Path(pretrained).suffix
    if not looks_like_path:
        known = open_clip.list_pretrained_tags_by_model(backbone)
        raise ModelError(
            f"unknown pretrained tag {pretrained!r} for {backbone} (known: {', '.join(known) or 'none'})"
        )
    path, tmp = _local_copy(pretrained)
    try:
        state = read_state_dict(path)
        state = {k.removeprefix("module.").removeprefix("clip."): v for k, v in state.items()}
        missing, unexpected = clip.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"checkpoint {pretrained} does not fit {backbone}: "
                f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected"
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {}


# ---- the model --------------------------------------------------------------------------------------


class MuMIC(nn.Module):
    def __init__(self, config: ModelConfig, taxonomy: Taxonomy, clip: nn.Module | None = None):
        super().__init__()
        if not config.arch:
            config.arch = resolve_arch(config.backbone)
        vision = config.arch["vision_cfg"]
        size = vision.get("image_size", 224)
        config.image_size = int(size if isinstance(size, int) else size[0])
        self.config = config
        self.taxonomy = taxonomy
        self.clip = clip if clip is not None else build_clip(config.arch)
        self.tokenizer = build_tokenizer(config.arch)

        init_tau = config.init_tau
        if init_tau is None:
            init_tau = 1.0 / float(self.clip.logit_scale.detach().exp())
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau)), requires_grad=config.learn_tau)
        self.bias = nn.Parameter(torch.tensor(float(config.init_bias)), requires_grad=config.use_bias)
        self.register_buffer("thresholds", torch.full((len(taxonomy),), 0.5))
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[tuple, torch.Tensor] = {}
        # open_clip's own temperature is unused: ours is log_tau
        self.clip.logit_scale.requires_grad_(False)
        if getattr(self.clip, "logit_bias", None) is not None:
            self.clip.logit_bias.requires_grad_(False)
        self.set_train_mode(config.train_mode)

    @classmethod
    def create(cls, taxonomy: Taxonomy, backbone: str = "ViT-B-32", pretrained: str | None = None, **kw):
        """Build a model from a backbone name/config and optional pretrained weights."""
        config = ModelConfig(backbone=backbone, pretrained=pretrained, **kw)
        config.arch = resolve_arch(backbone)
        clip = build_clip(config.arch)
        if pretrained:
            for k, v in load_pretrained(clip, backbone, pretrained).items():
                setattr(config, k, v)
        return cls(config, taxonomy, clip)

    # ---- parameters and train modes ----
    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.clip.visual.parameters()} | {id(self.clip.logit_scale)}
        if getattr(self.clip, "logit_bias", None) is not None:
            skip.add(id(self.clip.logit_bias))
        return [p for p in self.clip.parameters() if id(p) not in skip]

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.log_tau, self.bias]

    def set_train_mode(self, mode: str) -> None:
        if mode not in TRAIN_MODES:
            raise ModelError(f"unknown train_mode {mode!r}; known: {', '.join(TRAIN_MODES)}")
        self.config.train_mode = mode
        for p in self.image_parameters():
            p.requires_grad_(mode in ("both", "image"))
        for p in self.text_parameters():
            p.requires_grad_(mode == "both")
        self.log_tau.requires_grad_(self.config.learn_tau)
        self.bias.requires_grad_(self.config.use_bias)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_parameters())

    @property
    def tau(self) -> float:
        return float(self.log_tau.detach().exp())

    @property
    def embed_dim(self) -> int:
        return int(self.config.arch["embed_dim"])

    # ---- encoders ----
    def prepare_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B,3,H,W] (as the CPU stages ship them) or float → normalised float on the model's device."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        pixels = pixels.to(self.pixel_mean.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = (pixels.float() / 255.0 - self.pixel_mean) / self.pixel_std
        return pixels

    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        return F.normalize(self.clip.encode_image(self.prepare_pixels(pixels)), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        tokens = self.tokenizer(list(texts)).to(self.pixel_mean.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def _text_fingerprint(self) -> tuple:
        # `_version` increases on every in-place update (optimizer.step, load_state_dict, copy_), so
        # this changes exactly when the text tower's weights do.
        return tuple((p.data_ptr(), p._version) for p in self.text_parameters())

    def class_embeddings(self, taxonomy: Taxonomy | None = None) -> torch.Tensor:
        """[C, D]: per label, the normalised mean of its normalised prompt embeddings.

        Cached per (taxonomy, text-tower weights) whenever no gradient must flow into the text tower;
        recomputed inside the step while the text tower trains.
        """
        taxonomy = taxonomy or self.taxonomy
        needs_grad = torch.is_grad_enabled() and self.text_trainable
        key = (taxonomy.sha256, str(self.pixel_mean.device), self._text_fingerprint())
        if not needs_grad and key in self._text_cache:
            return self._text_cache[key]
        prompts = [taxonomy.prompts_for(label) for label in taxonomy.labels]
        flat = [p for ps in prompts for p in ps]
        emb = self.encode_texts(flat)  # [sum_k, D]
        owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps], device=emb.device)
        summed = torch.zeros(len(prompts), emb.shape[1], device=emb.device, dtype=emb.dtype)
        summed = summed.index_add(0, owner, emb)
        cls_emb = F.normalize(summed, dim=-1)
        if not needs_grad:
            if len(self._text_cache) > 8:
                self._text_cache.clear()
            cls_emb = self._text_cache[key] = cls_emb.detach()
        return cls_emb

    def logits_from_similarity(self, sim: torch.Tensor) -> torch.Tensor:
        return sim / self.log_tau.exp() + self.bias

    def forward(self, pixels: torch.Tensor | np.ndarray, taxonomy: Taxonomy | None = None) -> dict:
        img_emb = self.encode_images(pixels)  # [B, D]
        cls_emb = self.class_embeddings(taxonomy)  # [C, D]
        sim = img_emb @ cls_emb.t().to(img_emb.dtype)  # [B, C]
        logits = self.logits_from_similarity(sim)
        return {"img_emb": img_emb, "sim": sim, "logits": logits, "probs": torch.sigmoid(logits)}

    @torch.no_grad()
    def score(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Probabilities [B, C] for the model's taxonomy."""
        return self.forward(pixels)["probs"]

    @torch.no_grad()
    def score_labels(self, pixels: torch.Tensor | np.ndarray, labels: Sequence[str]) -> torch.Tensor:
        """Zero-shot: probabilities [B, L] for any label strings, prompted with the taxonomy's templates."""
        if not labels:
            raise ModelError("score_labels needs at least one label")
        return self.forward(pixels, self.taxonomy.with_labels(labels))["probs"]

    @torch.no_grad()
    def embed_query(self, text: str) -> torch.Tensor:
        """A text query embedded like a class (the taxonomy's templates, averaged): [D]."""
        return self.class_embeddings(self.taxonomy.with_labels([text]))[0]

    def set_thresholds(self, thresholds: Sequence[float] | np.ndarray) -> None:
        t = torch.as_tensor(np.asarray(thresholds, dtype=np.float32))
        if t.shape != self.thresholds.shape:
            raise ModelError(f"expected {self.thresholds.shape[0]} thresholds, got {t.shape}")
        self.thresholds.copy_(t.to(self.thresholds.device))

    def set_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Swap labels at inference time (new labels are scored zero-shot; thresholds of kept labels stay)."""
        old = {n: float(t) for n, t in zip(self.taxonomy.names, self.thresholds.tolist(), strict=True)}
        self.taxonomy = taxonomy
        self.thresholds = torch.tensor([old.get(n, 0.5) for n in taxonomy.names], device=self.thresholds.device)
