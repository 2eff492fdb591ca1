"""Annotated images, what training and evaluation read: `table` (read, resolve, validate and split an
annotations file), `pixels` (decode every split once into Ray Data) and `augment` (per-epoch numpy)."""

from .augment import AUGMENTATIONS, Augment, augment_batch, random_hflip, random_resized_crop
from .pixels import DecodedSplits, decode_batch, decode_splits, to_dataset
from .table import AnnotationError, Annotations, load

__all__ = [
    "AUGMENTATIONS",
    "AnnotationError",
    "Annotations",
    "Augment",
    "DecodedSplits",
    "augment_batch",
    "decode_batch",
    "decode_splits",
    "load",
    "random_hflip",
    "random_resized_crop",
    "to_dataset",
]
