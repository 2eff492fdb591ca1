"""Deterministic train/val/test assignment by hashing an image id: stable across runs, machines and
worker counts, so annotations without a `split` column always split the same way."""

from __future__ import annotations

import hashlib

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_of(image_id: str, val: float = 0.15, test: float = 0.15) -> str:
    """'test' for the first `test` fraction of the hash space, then 'val', else 'train'."""
    h = int(hashlib.sha256(str(image_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test else "val" if h < test + val else "train"
