"""Ray Data feeding for training and evaluation: annotations → decoded uint8 pixels → (augmented) batches.

Decoding runs once, in Ray Data CPU tasks (`map_batches`), before the workers start; each split is
materialised in the object store (spilling to disk when large), so epochs re-read pixels instead of
re-fetching and re-decoding. Images that cannot be read are counted and skipped here: the run goes on.
Per epoch, only cheap numpy work runs as Ray Data tasks: dropping unreadable rows and augmentation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from mumic_core import images

from .annotations import Annotations

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 128
AUGMENTATIONS = ("none", "flip", "crop")


# ---- augmentation (pure numpy on uint8 [B, 3, H, W]) ---------------------------------------------------


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


# ---- decode (Ray Data CPU tasks) ------------------------------------------------------------------------


def ensure_ray() -> None:
    """Join the cluster of RAY_ADDRESS (or start a local one) unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    resize_mode: str = "shortest",
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """(image_id, uri, labels, mask, split) → adds `image` uint8 [B, 3, S, S] and `error` ('' when ok).

    An unreadable row keeps a zero image and a one-line reason; it is dropped before training.
    """
    from .fetch import FetchFailed, fetch_one  # the retag fetch stage: retries, credential-free reasons

    n = len(batch["uri"])
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        try:
            pixels[i] = images.load_for_model(fetch_one(str(uri)), image_size, max_pixels, resize_mode)
            errors.append("")
        except (FetchFailed, images.ImageError) as e:
            errors.append(str(e))
    return {**batch, "image": pixels, "error": np.array(errors, dtype=object)}


def to_dataset(ann: Annotations):
    """A Ray Dataset of (image_id, uri, labels [C], mask [C], split), in blocks of ROWS_PER_BLOCK rows."""
    import ray

    labels, mask = ann.label_matrix(), ann.known_mask()
    rows = [
        {"image_id": i, "uri": u, "labels": labels[k], "mask": mask[k], "split": s}
        for k, (i, u, s) in enumerate(
            zip(ann.frame["image_id"], ann.frame["uri"], ann.frame["split"], strict=True)
        )
    ]
    return ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / ROWS_PER_BLOCK)))


@dataclass
class DecodedSplits:
    """Materialised decoded splits plus what could not be read."""

    datasets: dict = field(default_factory=dict)  # split → materialised Dataset (unreadable rows included)
    counts: dict[str, int] = field(default_factory=dict)  # split → readable images
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "split", "error"]))
    _eval: dict = field(default_factory=dict, repr=False)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def merge(self, other: DecodedSplits) -> None:
        self.datasets.update(other.datasets)
        self.counts.update(other.counts)
        self.errors = (
            pd.concat([self.errors, other.errors], ignore_index=True) if other.n_errors else self.errors
        )

    def train(self, augment: Augment | None = None):
        """The per-epoch training stream. The readable rows' tensors are materialised once (and the decoded
        split released); only augmentation, when enabled, runs as Ray Data tasks every epoch."""
        if "train" not in self._eval:
            self._eval["train"] = (
                self.datasets["train"].map_batches(train_rows, batch_size=None).materialize()
            )
            self.datasets.pop("train")
        rows = self._eval["train"]
        if augment is None or not augment.enabled:
            return rows
        return rows.map_batches(augment_batch, fn_kwargs={"augment": augment}, batch_size=None)

    def eval(self, split: str):
        """A split's readable rows, materialised: iterating it every epoch launches no task."""
        if split not in self._eval:
            ds = self.datasets[split]
            if (self.errors["split"] == split).any():
                ds = ds.map_batches(eval_batch, batch_size=None).materialize()
            self._eval[split] = ds
        return self._eval[split]


def decode_splits(
    ann: Annotations,
    image_size: int,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
    resize_mode: str = "shortest",
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
) -> DecodedSplits:
    """Fetch + decode every split once (Ray Data tasks), materialise, and count the unreadable images."""
    out = DecodedSplits()
    errors = []
    for split in splits:
        part = ann.split(split)
        if len(part) == 0:
            continue
        ds = (
            to_dataset(part)
            .map_batches(
                decode_batch,
                fn_kwargs={"image_size": image_size, "resize_mode": resize_mode, "max_pixels": max_pixels},
                batch_size=batch_size,
            )
            .materialize()
        )
        status = ds.select_columns(["image_id", "error"]).to_pandas()
        bad = status[status["error"] != ""].assign(split=split)
        errors.append(bad[["image_id", "split", "error"]])
        out.datasets[split] = ds
        out.counts[split] = int(len(status) - len(bad))
    out.errors = pd.concat(errors, ignore_index=True) if errors else out.errors
    if out.n_errors:
        log.warning(
            "%d of %d images could not be read and are skipped, e.g. %s: %s",
            out.n_errors,
            out.n_errors + sum(out.counts.values()),
            out.errors["image_id"].iloc[0],
            out.errors["error"].iloc[0],
        )
    return out
