"""Training-time augmentation, pure numpy on uint8 [B, 3, H, W]: random flip and random resized crop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

AUGMENTATIONS = ("none", "flip", "crop")


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: random horizontal flip and/or random resized crop."""

    hflip: bool = True
    crop: bool = False
    crop_scale_min: float = 0.6  # smallest crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def parse(cls, spec: str, crop_scale_min: float = 0.6) -> Augment:
        """'none', 'flip', 'crop' or 'flip,crop'."""
        parts = {p.strip() for p in str(spec).split(",") if p.strip()} or {"none"}
        unknown = parts - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; known: {', '.join(AUGMENTATIONS)}")
        if not 0 < crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        return cls(hflip="flip" in parts, crop="crop" in parts, crop_scale_min=crop_scale_min)

    @property
    def enabled(self) -> bool:
        return self.hflip or self.crop


def random_hflip(pixels: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Flip each image of [B, 3, H, W] left-right with probability p (a new array)."""
    out = pixels.copy()
    flip = rng.random(len(pixels)) < p
    out[flip] = pixels[flip][..., ::-1]
    return out


def random_resized_crop(
    pixels: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """torchvision's RandomResizedCrop on uint8 [B, 3, H, W]: a random box, resized back to (H, W)."""
    b, _, h, w = pixels.shape
    out = np.empty_like(pixels)
    for i in range(b):
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):  # as torchvision: try a few boxes, else keep the whole image
            area = h * w * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw_try, ch_try = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw_try <= w and 0 < ch_try <= h:
                ch, cw = ch_try, cw_try
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                break
        crop = pixels[i, :, top : top + ch, left : left + cw].transpose(1, 2, 0)  # [h, w, 3]
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.Resampling.BICUBIC)
        out[i] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
    return out


def train_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Readable rows, and only the tensors the workers need (strings cannot become torch tensors)."""
    ok = batch["error"] == ""
    return {"image": batch["image"][ok], "labels": batch["labels"][ok], "mask": batch["mask"][ok]}


def augment_batch(batch: dict[str, np.ndarray], augment: Augment) -> dict[str, np.ndarray]:
    """Per-epoch map_batches fn: a different random augmentation of every image each epoch."""
    if not augment.enabled or not len(batch["image"]):
        return batch
    rng = np.random.default_rng()  # fresh entropy per task
    image = batch["image"]
    if augment.crop:
        image = random_resized_crop(image, rng, (augment.crop_scale_min, 1.0), augment.crop_ratio)
    if augment.hflip:
        image = random_hflip(image, rng)
    return {**batch, "image": image}


def train_batch(batch: dict[str, np.ndarray], augment: Augment | None = None) -> dict[str, np.ndarray]:
    """train_rows + augment_batch in one call."""
    out = train_rows(batch)
    return augment_batch(out, augment) if augment is not None else out


def eval_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = batch["error"] == ""
    return {k: v[ok] for k, v in batch.items() if k != "uri"}
