"""Evaluation artifacts for MLflow: per-class AP table and bars, PR curves, metrics.json, confused pairs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd

from mumic_core import metrics
from mumic_core.taxonomy import Taxonomy

from .report import Report, confused_pairs
from .scoring import Scored

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def write_artifacts(
    folder: str,
    reports: Sequence[Report],
    scored: Scored,
    taxonomy: Taxonomy,
    thresholds: np.ndarray,
) -> list[str]:
    """Files for MLflow: per_class_ap.csv (one AP column per report), metrics.json, per_class_ap.png,
    pr_curves.png and confused_pairs.csv for `scored` (the first report's split), taxonomy.json."""
    os.makedirs(folder, exist_ok=True)
    names = taxonomy.names
    table = pd.DataFrame({"label": names, "unseen": taxonomy.unseen_mask, "threshold": thresholds})
    for r in reports:
        table[f"{r.split}_ap"] = [r.per_class_ap.get(n, math.nan) for n in names]
        table[f"{r.split}_positives"] = [r.n_positives.get(n, 0) for n in names]
    paths = [os.path.join(folder, "per_class_ap.csv")]
    table.to_csv(paths[-1], index=False)
    paths.append(os.path.join(folder, "metrics.json"))
    with open(paths[-1], "w") as f:
        json.dump({r.split: r.metrics for r in reports}, f, indent=2, default=float)
    paths.append(os.path.join(folder, "taxonomy.json"))
    with open(paths[-1], "w") as f:
        json.dump(taxonomy.to_dict(), f, indent=2)

    main = reports[0]
    ap = np.array([main.per_class_ap.get(n, math.nan) for n in names])
    order = np.argsort(np.nan_to_num(ap, nan=-1.0))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(names) + 1)))
    ax.barh([names[i] for i in order], np.nan_to_num(ap[order], nan=0.0), color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"average precision ({main.split})")
    ax.set_title(f"per-class AP, mAP {main.metrics.get('map', math.nan):.3f}")
    fig.tight_layout()
    paths.append(os.path.join(folder, "per_class_ap.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    shown = [i for i in np.argsort(-np.nan_to_num(ap, nan=-1.0)) if not math.isnan(ap[i])][:20]
    for c in shown:
        precision, recall, _ = metrics.pr_curve(scored.scores[:, c], scored.labels[:, c], scored.mask[:, c])
        ax.plot(recall, precision, label=f"{names[c]} ({ap[c]:.2f})", linewidth=1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall per class ({main.split})")
    if shown:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    paths.append(os.path.join(folder, "pr_curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    paths.append(os.path.join(folder, "confused_pairs.csv"))
    confused_pairs(scored.scores, scored.labels, scored.mask, thresholds, names).to_csv(
        paths[-1], index=False
    )
    return paths
