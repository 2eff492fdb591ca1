"""The model: an open_clip backbone and a head from the registry (`mumic_core.heads`), scored against
class text embeddings, so any label string can be scored through the text tower.

    features = f_I(x)                                # backbone: pooled [B, D] (+ patch tokens for some heads)
    cls_emb  = normalize(mean_k normalize(f_T(p_ck))) # [C, D]  (one per label, from its prompts)
    out      = head(features, cls_emb)               # probs [B, C]; img_emb [B, D] in the text space
    (head `mumic`: p = sigmoid(normalize(pooled) @ cls_emb.T / tau + b))

Everything that defines a model version (architecture, head and its options, taxonomy, tau, bias,
thresholds, preprocessing) lives in `ModelConfig` + the state dict, which `mumic_core.checkpoint` saves as
safetensors + JSON.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import heads
from .heads import Head, ImageFeatures
from .model_config import TRAIN_MODES, ModelConfig, ModelError, check_arch  # torch-free; re-exported
from .taxonomy import Taxonomy

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@functools.cache
def open_clip_module():
    """open_clip, imported on first use, with `mumic-tiny` (and any JSON shipped in MODEL_CONFIG_DIR)
    registered. Not at import: open_clip brings torchvision and, through it, torch._dynamo (~2 s of CPU),
    which a process that only reads and checks saved configs (a retag driver, `mumic vacuum`) never uses."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


# ---- backbone ---------------------------------------------------------------------------------------


def resolve_arch(backbone: str) -> dict[str, Any]:
    """open_clip architecture dict for a registered name or an architecture JSON file (local or URI)."""
    cfg = open_clip_module().get_model_config(backbone)
    if cfg is not None:
        return copy.deepcopy(cfg)
    if backbone.endswith(".json"):
        import fsspec

        try:
            with fsspec.open(backbone, "r") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ModelError(f"backbone config not found: {backbone}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"backbone config {backbone} is not JSON: {type(e).__name__}: {e}") from None
        data = data.get("model_cfg", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or "vision_cfg" not in data or "text_cfg" not in data:
            raise ModelError(f"{backbone}: an architecture needs 'vision_cfg' and 'text_cfg'")
        check_arch(data, backbone)
        return data
    raise ModelError(f"unknown backbone {backbone!r}: not an open_clip model name nor a .json config")


def build_clip(arch: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip CLIP (random init) from an architecture dict, as open_clip's factory does.

    The sizes are bounded first (check_arch); a field open_clip does not know is a ModelError too."""
    check_arch(arch)
    cfg = copy.deepcopy(arch)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    open_clip = open_clip_module()
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**cfg)
    except TypeError as e:  # an unknown keyword in the architecture (open_clip's dataclasses refuse it)
        raise ModelError(f"architecture not understood by open_clip: {e}") from None


# What fills a fresh layer with random numbers: torch.nn.init's random initialisers (open_clip and torch's
# own layers call these) and the in-place random fills under them.
_INITIALISERS = "uniform_ normal_ trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_"
RANDOM_INITS = frozenset(
    {
        *(getattr(torch.nn.init, name) for name in (*_INITIALISERS.split(), "xavier_normal_", "orthogonal_")),
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
    }
)


class NoRandomInit(TorchFunctionMode):
    """Build modules without drawing their random initial weights (`with NoRandomInit(): MuMIC(...)`), for
    a model whose every weight is loaded next: that init is most of a CPU model load (ViT-B-32: ~4 of 5 s).

    The tensors are allocated as usual and left unfilled; everything else a constructor computes (fixed
    values, masks, non-persistent buffers, a head reading the backbone) runs as before, so a load after it
    gives the same model. Modes are per thread: other threads still initialise as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RANDOM_INITS:
            return args[0] if args else kwargs["tensor"]  # the tensor these fill in place and return
        return func(*args, **(kwargs or {}))


def build_tokenizer(arch: dict[str, Any]):
    open_clip = open_clip_module()
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
    open_clip = open_clip_module()
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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device` right now, or None when it is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


# ---- the model --------------------------------------------------------------------------------------


class MuMIC(nn.Module):
    """The backbone (`clip`) and a head (`head`, from the registry by `config.head`); per-label thresholds.

    The one interface of every head, used by `Scorer`, training and checkpoints alike:
      image_features(pixels)             → ImageFeatures, under whatever precision the caller set
      class_embeddings(taxonomy)         → [C, D], cached while the text side does not train
      score_features(features, cls_emb)  → {"probs" [B, C], "img_emb" [B, D], ...}, always fp32
    `forward` is the three in a row.
    """

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
        try:
            self.head: Head = heads.build_head(config, self.clip, self.tokenizer)
        except ValueError as e:
            raise ModelError(f"head {config.head} on {config.backbone}: {e}") from None
        # the image tower hands the patch tokens over too, for the heads that read them
        self.clip.visual.output_tokens = self.head.tokens is not None
        self.register_buffer("thresholds", torch.full((len(taxonomy),), 0.5))
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see prompt_tokens
        self._last_sha256: tuple[Taxonomy | None, str] = (None, "")
        # open_clip's own temperature is unused: the head has its own (if any)
        self.clip.logit_scale.requires_grad_(False)
        if getattr(self.clip, "logit_bias", None) is not None:
            self.clip.logit_bias.requires_grad_(False)
        self.stage = self.head.stages[0]
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

    # ---- parameters, train modes and stages ----
    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.clip.visual.parameters()} | {id(self.clip.logit_scale)}
        if getattr(self.clip, "logit_bias", None) is not None:
            skip.add(id(self.clip.logit_bias))
        return [p for p in self.clip.parameters() if id(p) not in skip]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def set_train_mode(self, mode: str) -> None:
        """What trains (methods.md §1), as the head applies it in the current stage."""
        if mode not in TRAIN_MODES:
            raise ModelError(f"unknown train_mode {mode!r}; known: {', '.join(TRAIN_MODES)}")
        self.config.train_mode = mode
        self.head.set_trainable(self, mode, self.stage)

    def begin_stage(self, stage: int) -> None:
        """Make `stage` of the head's training (`head.stages`) the one that trains next."""
        if stage not in self.head.stages:
            raise ModelError(f"head {self.config.head} has no stage {stage}; its stages: {list(self.head.stages)}")
        self.stage = stage
        self.head.begin_stage(self, stage)
        self.set_train_mode(self.config.train_mode)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in (*self.text_parameters(), *self.head.text_parameters()))

    @property
    def tau(self) -> float | None:
        """The head's temperature (MuMIC's learned τ, CLIP-Decoder's L_clip τ); None for a head without."""
        return self.head.tau

    @property
    def log_tau(self) -> nn.Parameter:
        """The MuMIC head's log τ (AttributeError for other heads)."""
        return self.head.log_tau

    @property
    def bias(self) -> nn.Parameter:
        """The MuMIC head's bias b (AttributeError for other heads)."""
        return self.head.bias

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

    def image_features(self, pixels: torch.Tensor | np.ndarray) -> ImageFeatures:
        """The image tower's output for the head: the pooled projection and, if the head reads them, the
        patch tokens (after ln_post; projected too for `tokens == "embed"`)."""
        visual = self.clip.visual
        out = visual(self.prepare_pixels(pixels))
        if self.head.tokens is None:
            return ImageFeatures(out)
        pooled, tokens = out  # [B, D], [B, N, W]
        if self.head.tokens == "embed":
            tokens = tokens @ visual.proj  # [B, N, D]
        return ImageFeatures(pooled, tokens)

    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """L2-normalised pooled image embeddings [B, D] (the backbone's, before any head)."""
        return F.normalize(self.image_features(pixels).pooled, dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        tokens = self.tokenizer(list(texts)).to(self.pixel_mean.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def _text_fingerprint(self) -> tuple:
        # `_version` increases on every in-place update (optimizer.step, load_state_dict, copy_), so
        # this changes exactly when the text side's weights do; the head's options say which text path
        # it takes (MKT's learned prompt once stage 2 has begun).
        params = (*self.text_parameters(), *self.head.text_parameters())
        return (*((p.data_ptr(), p._version) for p in params), repr(self.config.head_options))

    def _sha256(self, taxonomy: Taxonomy) -> str:
        # a Taxonomy is frozen: the same object has the same hash, and a training step asks for the same
        # one every time (the hash of 1000 labels is a JSON dump, ~1 ms)
        if self._last_sha256[0] is not taxonomy:
            self._last_sha256 = (taxonomy, taxonomy.sha256)
        return self._last_sha256[1]

    def prompt_tokens(self, taxonomy: Taxonomy) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [P, L] of every prompt of every label, and the label each belongs to [P], on the
        model's device: tokenised once per (taxonomy, tokenizer, context length, device), not every step
        (1000 prompts take the tokenizer ~40 ms; the text tower trains on the same ids every step)."""
        device = self.pixel_mean.device
        context = getattr(self.tokenizer, "context_length", None)
        key = (self._sha256(taxonomy), id(self.tokenizer), context, str(device))
        if key not in self._token_cache:
            prompts = [taxonomy.prompts_for(label) for label in taxonomy.labels]
            tokens = self.tokenizer([p for ps in prompts for p in ps]).to(device)  # [P, L]
            owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps], device=device)  # [P]
            if len(self._token_cache) >= 8:  # zero-shot label sets come and go; the taxonomy is re-made once
                self._token_cache.clear()
            self._token_cache[key] = (tokens, owner)
        return self._token_cache[key]

    def prompt_embeddings(self, taxonomy: Taxonomy) -> torch.Tensor:
        """[C, D]: per label, the normalised mean of its normalised prompt embeddings."""
        tokens, owner = self.prompt_tokens(taxonomy)
        emb = F.normalize(self.clip.encode_text(tokens), dim=-1)  # [P, D]
        summed = torch.zeros(len(taxonomy), emb.shape[1], device=emb.device, dtype=emb.dtype)
        summed = summed.index_add(0, owner, emb)
        return F.normalize(summed, dim=-1)

    def class_embeddings(self, taxonomy: Taxonomy | None = None) -> torch.Tensor:
        """[C, D] L2-normalised, as the head makes them (by default `prompt_embeddings`).

        Cached per (taxonomy, device, autocast dtype, text-side weights) whenever no gradient must flow
        into the text side; recomputed inside the step while it trains. The autocast dtype is in the key:
        embeddings made under a training step's bf16 autocast are never served to an fp32 scoring call.
        """
        taxonomy = taxonomy or self.taxonomy
        if torch.is_grad_enabled() and self.text_trainable:
            return self.head.encode_classes(self, taxonomy)
        device = self.pixel_mean.device
        key = (self._sha256(taxonomy), str(device), autocast_dtype(device), self._text_fingerprint())
        if key not in self._text_cache:
            if len(self._text_cache) > 8:
                self._text_cache.clear()
            self._text_cache[key] = self.head.encode_classes(self, taxonomy).detach()
        return self._text_cache[key]

    def seed_class_embeddings(self, emb: torch.Tensor) -> None:
        """Serve `emb` [C, D] as the class embeddings of the model's own taxonomy, on its current device and
        outside autocast, until the text side's weights change: the ones saved with the model
        (`checkpoint`), so that loading it does not run every prompt through the text tower again."""
        device = self.pixel_mean.device
        key = (self._sha256(self.taxonomy), str(device), None, self._text_fingerprint())
        self._text_cache[key] = emb.detach().to(device)

    def score_features(self, features: ImageFeatures, cls_emb: torch.Tensor) -> dict:
        """The head on image features and class embeddings, in fp32 whatever autocast is on."""
        with heads.no_autocast(features.pooled.device):
            return self.head(features.float(), cls_emb.float())

    def forward(self, pixels: torch.Tensor | np.ndarray, taxonomy: Taxonomy | None = None) -> dict:
        features = self.image_features(pixels)
        return self.score_features(features, self.class_embeddings(taxonomy))

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
