"""Generated multi-label images whose labels a tiny model can learn in a minute on a CPU.

Each image is 1-2 coloured discs (small or large, plain or striped) on a light or dark background,
sometimes checkered. Labels are the colours present, whether any disc is striped or large, and the
background's attributes: compositional, multi-label and unambiguous. With `compositional=True` an image
also gets labels that combine seen words about one disc ("large red object", "striped blue object"),
which the open-vocabulary ablations hold out as unseen (the draws, hence images and base labels, are the
same either way). Used by the tests, the benchmarks, `mumic quickstart` and `mumic ablate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .splits import split_of
from .taxonomy import Label, Taxonomy

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
}
OBJECTS = ("striped object", "large object")
BACKGROUNDS = ("checkered background", "dark background")
LABELS: tuple[str, ...] = tuple(COLOURS) + OBJECTS + BACKGROUNDS
# One disc's size or stripes with its colour: every word is also a label of its own.
COMPOSITIONAL_LABELS: tuple[str, ...] = tuple(
    f"{kind} {colour} object" for kind in ("large", "striped") for colour in COLOURS
)
# What the ablation config holds out: pairs whose words are all seen, but never together.
COMPOSITIONAL_UNSEEN: tuple[str, ...] = ("large yellow object", "striped green object")

__all__ = [
    "COMPOSITIONAL_LABELS",
    "COMPOSITIONAL_UNSEEN",
    "LABELS",
    "label_names",
    "make_arrays",
    "make_image",
    "split_of",
    "taxonomy",
    "write_dataset",
]


def label_names(compositional: bool = False) -> tuple[str, ...]:
    return LABELS + COMPOSITIONAL_LABELS if compositional else LABELS


def taxonomy(unseen: tuple[str, ...] = (), compositional: bool = False) -> Taxonomy:
    """The generated catalog's taxonomy; `unseen` marks labels held out of training (zero-shot)."""
    # The bare label as its prompt: a randomly initialised text tower maps long prompts that share all
    # but one word ("a photo of a red.", "a photo of a blue.") to nearly the same vector (cos ~0.99),
    # which a pretrained CLIP would not; short prompts keep the classes apart from the first step.
    names = label_names(compositional)
    return Taxonomy(tuple(Label(n, unseen=n in unseen) for n in names), ("{}",))


def make_image(
    rng: np.random.Generator, size: int = 96, compositional: bool = False
) -> tuple[Image.Image, list[str]]:
    dark = bool(rng.random() < 0.4)
    checkered = bool(rng.random() < 0.35)
    base = int(rng.integers(20, 70)) if dark else int(rng.integers(170, 235))
    px = np.full((size, size, 3), base, dtype=np.int16)
    px += rng.integers(-12, 13, size=(size, size, 1), dtype=np.int16)  # texture noise
    if checkered:
        half = int(rng.integers(4, 8))
        cells = ((np.arange(size)[:, None] // half) + (np.arange(size)[None, :] // half)) % 2 == 0
        px[cells] += 45 if dark else -45
    labels: set[str] = set()
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 3))):
        colour = str(rng.choice(list(COLOURS)))
        large = bool(rng.random() < 0.4)
        striped = bool(rng.random() < 0.4)
        # sizes are bimodal so "large" is never a judgement call
        r = int(rng.integers(size // 5, size // 4 + 1)) if large else int(rng.integers(size // 16, size // 10 + 1))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        fill = np.array([np.clip(c + rng.integers(-20, 21), 0, 255) for c in COLOURS[colour]], dtype=np.int16)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        px[inside] = fill
        if striped:  # dark diagonal stripes across the disc
            px[inside & (((yy + xx) // 3) % 2 == 0)] = fill // 3
            labels.add("striped object")
        labels.add(colour)
        if large:
            labels.add("large object")
        if compositional:  # from this disc's draws only: no extra random numbers
            labels.update(f"{kind} {colour} object" for kind, on in (("large", large), ("striped", striped)) if on)
    if checkered:
        labels.add("checkered background")
    if dark:
        labels.add("dark background")
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")
    return img, [n for n in label_names(compositional) if n in labels]


def write_dataset(
    folder: str | Path,
    n: int,
    seed: int = 0,
    size: int = 96,
    fmt: str = "jpg",
    quality: int = 90,
    compositional: bool = False,
) -> list[dict]:
    """Write `n` images under `folder/images/` and return annotation rows
    (image_id, uri relative to `folder`, labels, split); `compositional` adds COMPOSITIONAL_LABELS."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img, labels = make_image(rng, size, compositional)
        image_id = f"img-{seed}-{i:06d}"
        rel = f"images/{image_id}.{fmt}"
        if fmt == "jpg":
            img.save(folder / rel, quality=quality)
        else:
            img.save(folder / rel)
        rows.append({"image_id": image_id, "uri": rel, "labels": labels, "split": split_of(image_id)})
    return rows


def make_arrays(
    n: int, seed: int = 0, size: int = 96, compositional: bool = False
) -> tuple[list[Image.Image], np.ndarray]:
    """In-memory images and their multi-hot label matrix [n, C] (C = len(LABELS), plus the compositional
    labels when asked)."""
    rng = np.random.default_rng(seed)
    names = label_names(compositional)
    images, y = [], np.zeros((n, len(names)), dtype=np.uint8)
    for i in range(n):
        img, labels = make_image(rng, size, compositional)
        images.append(img)
        for lb in labels:
            y[i, names.index(lb)] = 1
    return images, y
