"""The baseline rows of an ablation, through the one scoring path (`Scorer`): zero-shot scoring with the
untrained starting model, and a linear probe (one logistic regression per label) on its frozen image
embeddings (methods.md §5)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mumic_core import checkpoint
from mumic_core.model import MuMIC
from mumic_core.scoring import Scorer
from mumic_core.taxonomy import Taxonomy

from .. import annotations
from ..evaluation import Scored
from ..train.config import TrainConfig
from .data import DataSet


@dataclass(frozen=True)
class Pass:
    """One split scored by one model: the scores (zero-shot for the untrained model) and embeddings."""

    scored: Scored
    embeddings: np.ndarray  # [N, D] float32, L2-normalised


def starting_model(options: dict[str, Any], taxonomy: Taxonomy, folder: Path) -> str:
    """The model a cell with these options starts from (seeded as every training rank seeds it), saved
    once into `folder`."""
    if not (folder / checkpoint.CONFIG).exists():
        cfg = TrainConfig(**options, annotations="-", taxonomy="-")
        torch.manual_seed(cfg.seed)
        checkpoint.save(MuMIC.create(taxonomy, **cfg.model_options()), folder)
    return str(folder)


def decode(data: DataSet, options: dict[str, Any], image_size: int) -> dict[str, Any]:
    """train and val as training sees them (unseen labels dropped and masked), test with every label's
    truth: the same rows and truth the trained cells are evaluated on."""
    cfg = TrainConfig(**options, annotations=data.annotations, taxonomy=data.taxonomy_path)
    fractions = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    pixels = {"image_size": image_size, "resize_mode": cfg.resize_mode, "max_pixels": cfg.max_pixels}
    ann = annotations.load(data.annotations, data.taxonomy, drop_unseen=True, **fractions)
    decoded = annotations.decode_splits(ann, splits=("train", "val"), **pixels)
    full = annotations.load(data.annotations, data.taxonomy, drop_unseen=False, require=(), **fractions)
    decoded.merge(annotations.decode_splits(full, splits=("test",), **pixels))
    return {split: decoded.eval(split) for split in decoded.datasets}


def score(model_dir: str, ds, batch_size: int = 128) -> Pass:
    """Scores and embeddings of every readable row of a decoded split, sorted by image id."""
    scorer = Scorer.load(model_dir)
    ids, scores, embs, labels, masks = [], [], [], [], []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out = scorer.predict(batch["image"], batch_size=batch_size)
        ids.append(batch["image_id"].astype(str))
        scores.append(out.scores)
        embs.append(out.embeddings)
        labels.append(batch["labels"])
        masks.append(batch["mask"])
    order = np.argsort(np.concatenate(ids), kind="stable")
    ids_, scores_, embs_, labels_, masks_ = (np.concatenate(a)[order] for a in (ids, scores, embs, labels, masks))
    return Pass(Scored(ids_, scores_, labels_, masks_), embs_)


def linear_probe(train: Pass, evaluated: dict[str, Pass], seed: int) -> dict[str, Scored]:
    """One standardised logistic regression per label on the frozen embeddings of train; a label with no
    positive (or no negative) in train, such as an unseen one, gets that constant."""
    # scikit-learn: only the probe needs it (a runtime dependency for `mumic ablate`)
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    targets = train.scored.labels * train.scored.mask  # unknown truth counts as a negative here
    probe = OneVsRestClassifier(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        probe.fit(train.embeddings, targets)
    return {
        split: Scored(
            p.scored.image_ids, probe.predict_proba(p.embeddings).astype(np.float32), p.scored.labels,
            p.scored.mask,
        )
        for split, p in evaluated.items()
    }
