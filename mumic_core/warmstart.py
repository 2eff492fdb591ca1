"""Warm start (`mumic train --init`): a saved model's weights carried into a model over a new taxonomy,
per-label state moved by label name, so retraining on fresh annotations starts from the last version."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .model import ModelConfig, ModelError, MuMIC
from .taxonomy import Taxonomy

# State-dict entries whose first dimension is the label (one row per taxonomy label). A head with
# per-class parameters names its own in a `per_class_keys` attribute; any other entry must fit as is.
PER_CLASS_KEYS: tuple[str, ...] = ("thresholds",)

# What a new training run chooses for itself; everything else (backbone, head, its options, preprocessing
# size and statistics) comes from the saved model, whose weights would not fit anything else.
TRAINING_CHOICES: tuple[str, ...] = ("train_mode", "learn_tau", "use_bias", "resize_mode")


@dataclass(frozen=True)
class Transfer:
    """Which labels a warm start kept (their state copied), added (fresh defaults) and dropped."""

    kept: tuple[str, ...]
    added: tuple[str, ...]
    dropped: tuple[str, ...]


def per_class_keys(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "per_class_keys", PER_CLASS_KEYS))


def warm_start(
    saved: MuMIC, taxonomy: Taxonomy, options: Mapping[str, Any] | None = None
) -> tuple[MuMIC, Transfer]:
    """A new model over `taxonomy`, built from `saved`'s config, holding `saved`'s weights.

    Kept labels keep their per-label state (threshold, any per-class parameter); new labels keep the new
    model's defaults (threshold 0.5; MuMIC scores them through their text embeddings, from the first
    step); dropped labels disappear. From `options` (a training run's model options) only
    TRAINING_CHOICES are taken.
    """
    chosen = {k: v for k, v in (options or {}).items() if k in TRAINING_CHOICES}
    config = ModelConfig.from_dict({**saved.config.to_dict(), **chosen})
    fresh = type(saved)(config, taxonomy)
    return fresh, transfer_weights(saved, fresh)


def transfer_weights(source: torch.nn.Module, target: torch.nn.Module) -> Transfer:
    """Copy `source`'s state into `target` (in place), remapping per-label rows by label name."""
    old, new = source.taxonomy.names, target.taxonomy.names
    row_of = {name: i for i, name in enumerate(old)}
    src, dst = source.state_dict(), target.state_dict()
    per_class = set(per_class_keys(target))
    missing = sorted(set(dst) - set(src))
    if missing:
        raise ModelError(f"cannot warm-start: the saved model has no {missing[:3]} (another head?)")
    state = {}
    for key, fresh in dst.items():
        value = src[key]
        if key in per_class:
            rows = fresh.detach().clone()  # [C_new, ...] the new model's defaults
            for j, name in enumerate(new):
                if name in row_of:
                    rows[j] = value[row_of[name]].to(rows.dtype)
            state[key] = rows
        elif value.shape != fresh.shape:
            raise ModelError(
                f"cannot warm-start: {key} is {tuple(value.shape)} in the saved model, "
                f"{tuple(fresh.shape)} in the new one"
            )
        else:
            state[key] = value
    target.load_state_dict(state, strict=True)
    return Transfer(
        kept=tuple(n for n in new if n in row_of),
        added=tuple(n for n in new if n not in row_of),
        dropped=tuple(n for n in old if n not in set(new)),
    )
