"""The one scoring path: a saved model → uint8 pixels → label scores, embeddings and the chosen labels.

Every consumer (the retag actors, evaluation, the MLflow pyfunc, `mumic tag`, `mumic search`) scores
through `Scorer`, so a head, a precision rule or a label-selection rule changes here and nowhere else.
No Ray, no MLflow: a Scorer wraps a `MuMIC` model on one device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from . import precision as precision_rule
from .images import DEFAULT_MAX_PIXELS, load_for_model
from .model import ModelError, MuMIC

ZERO_SHOT_THRESHOLD = 0.5  # labels scored zero-shot have no tuned threshold


def select_labels(
    scores: np.ndarray, thresholds: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: labels at/above their threshold plus the top-k, best first (ties in label order).

    scores [B, C], thresholds [C] → (label index [M], score [M], count per row [B]) with rows concatenated.
    """
    order = np.argsort(-scores, axis=1, kind="stable")  # [B, C] best first
    ranked = np.take_along_axis(scores, order, axis=1)  # [B, C]
    keep = (ranked >= thresholds[order]) | (np.arange(scores.shape[1])[None, :] < top_k)  # [B, C]
    return order[keep], ranked[keep], keep.sum(axis=1)


@dataclass(frozen=True)
class Chosen:
    """One selected label of one image."""

    label: str
    score: float
    above_threshold: bool  # False: kept only as one of the top-k


@dataclass(frozen=True)
class Scores:
    names: list[str]  # [C] label names, the columns of `scores`
    thresholds: np.ndarray  # [C] float32
    scores: np.ndarray  # [B, C] float32 probabilities
    embeddings: np.ndarray  # [B, D] float32, L2-normalised, in the text tower's space

    def chosen(self, top_k: int) -> list[list[Chosen]]:
        """Per image: labels at/above threshold plus the top-k, best first (`select_labels`)."""
        idx, score, counts = select_labels(self.scores, self.thresholds, top_k)
        out, start = [], 0
        for n in counts:
            out.append(
                [
                    Chosen(self.names[c], float(s), bool(s >= self.thresholds[c]))
                    for c, s in zip(idx[start : start + n], score[start : start + n], strict=True)
                ]
            )
            start += n
        return out


def default_device() -> torch.device:
    return precision_rule.resolve_device(None)


class Scorer:
    """A model on a device, ready to score batches of uint8 [B, 3, H, W] pixels.

    Scoring runs under no_grad, not inference_mode: the cached class embeddings of a model that is still
    training (validation) must stay usable by autograd in the next step.
    """

    def __init__(
        self, model: MuMIC, device: str | torch.device | None = None, precision: str | None = "auto"
    ):
        """`precision` follows `mumic_core.precision` (auto: bf16 image tower on a GPU, fp32 on a CPU);
        int8 quantises the model's image tower in place, so pass it only for a model this Scorer owns."""
        self.device = precision_rule.resolve_device(device)  # cuda asked for but unusable: DeviceError
        self.precision = precision_rule.resolve(precision, self.device)
        self.model = model.to(self.device).eval()
        with torch.no_grad():
            self.model.class_embeddings()  # the cached [C, D] text side, built once (fp32) before quantising
        precision_rule.prepare(self.model, self.precision)

    @classmethod
    def load(
        cls,
        uri: str | Path,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
        precision: str | None = "auto",
    ) -> Scorer:
        """A saved model folder (local or s3://) on `device` (default: cuda when available)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        device = precision_rule.resolve_device(device)  # before reading weights: fail fast, in one line
        return cls(checkpoint.load(uri, map_location=device), device, precision)

    # ---- what the model expects and gives ----
    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def resize_mode(self) -> str:
        return self.model.config.resize_mode

    @property
    def names(self) -> list[str]:
        return self.model.taxonomy.names

    @property
    def thresholds(self) -> np.ndarray:
        return self.model.thresholds.float().cpu().numpy()

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def pixels(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes → uint8 [3, H, W] preprocessed as this model was trained (raises ImageError)."""
        return load_for_model(data, self.image_size, max_pixels, self.resize_mode)

    def _autocast(self):
        """The image tower in this Scorer's precision; the head after it in fp32 (`mumic_core.precision`)."""
        return precision_rule.image_tower_autocast(self.model, self.precision, self.device)

    # ---- scoring ----
    def predict(
        self, pixels: np.ndarray, labels: Sequence[str] | None = None, batch_size: int = 256
    ) -> Scores:
        """uint8 [B, 3, H, W] → Scores. `labels` scores those label strings zero-shot (through the text
        tower, with the taxonomy's prompt templates) instead of the model's taxonomy."""
        if labels is not None and not labels:
            raise ModelError("zero-shot scoring needs at least one label")
        taxonomy = self.model.taxonomy.with_labels(labels) if labels else None
        names = list(labels) if labels else self.names
        thresholds = (
            np.full(len(names), ZERO_SHOT_THRESHOLD, np.float32) if labels else self.thresholds
        )
        scores = np.zeros((len(pixels), len(names)), np.float32)
        embeddings = np.zeros((len(pixels), self.embed_dim), np.float32)
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
            with torch.no_grad(), self._autocast():
                out = self.model(batch, taxonomy)
            end = start + len(batch)
            scores[start:end] = out["probs"].float().cpu().numpy()
            embeddings[start:end] = torch.nn.functional.normalize(out["img_emb"].float(), dim=-1).cpu().numpy()
        return Scores(names, thresholds, scores, embeddings)

    def embed_text(self, text: str) -> np.ndarray:
        """A text query embedded as a label is (the taxonomy's templates, averaged): [D] float32."""
        with torch.no_grad():
            return self.model.embed_query(text).float().cpu().numpy()
