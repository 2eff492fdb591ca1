"""Evaluation: score annotated images with a saved model (Ray Data actors), compute the one set of metrics
(`mumic_core.metrics`), and write the report artifacts (per-class AP table, PR curves, AP bars, the most
confused label pairs). Used after training and by `mumic evaluate`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mumic_core import metrics
from mumic_core.taxonomy import Taxonomy

log = logging.getLogger(__name__)

HEADLINE = ("map", "gap", "gap_at_10", "f1_at_3", "f1_at_5")


# ---- scoring ---------------------------------------------------------------------------------------------


class Scorer:
    """Callable class for map_batches on an actor pool: the model is loaded once per actor."""

    def __init__(self, model_uri: str, device: str = "cpu", num_threads: int | None = None):
        import torch

        from mumic_core import checkpoint

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = checkpoint.load(model_uri, map_location=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            scores = self.model.score(batch["image"]).float().cpu().numpy()  # [B, C]
        return {
            "image_id": batch["image_id"],
            "scores": scores,
            "labels": batch["labels"],
            "mask": batch["mask"],
        }


@dataclass
class Scored:
    image_ids: np.ndarray  # [N]
    scores: np.ndarray  # [N, C] float32
    labels: np.ndarray  # [N, C] uint8
    mask: np.ndarray  # [N, C] uint8, 1 = known


def score_dataset(ds, model_uri: str, use_gpu: bool = False, batch_size: int = 64) -> Scored:
    """Scores of every row of a decoded dataset (image, image_id, labels, mask), sorted by image_id.

    With a GPU, a Ray Data actor (the model loaded once, on the GPU) scores the batches; on CPU the
    driver scores the stream itself: the same speed as one CPU actor, without starting a process.
    """
    if use_gpu:
        stream = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={"model_uri": model_uri, "device": "cuda"},
            batch_size=batch_size,
            compute=_actor_pool(),
            num_gpus=1,
        ).iter_batches(batch_size=None, batch_format="numpy")
    else:
        scorer = Scorer(model_uri, device="cpu")
        stream = (scorer(b) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    parts = list(stream)
    if not parts:
        raise ValueError("nothing to score: no readable images")
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image_id", "scores", "labels", "mask")}
    order = np.argsort(out["image_id"], kind="stable")
    return Scored(*(out[k][order] for k in ("image_id", "scores", "labels", "mask")))


def _actor_pool():
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)


# ---- reports ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Metrics of one split: `metrics` holds floats (map, gap, gap_at_10, f1_at_3, f1_at_5, ..., zsl_*,
    gzsl_*, baseline_*); `per_class_ap` maps label → AP (NaN without positives)."""

    split: str
    metrics: dict[str, float] = field(default_factory=dict)
    per_class_ap: dict[str, float] = field(default_factory=dict)
    n_positives: dict[str, int] = field(default_factory=dict)

    def headline(self) -> str:
        parts = [f"{k} {self.metrics.get(k, math.nan):.4f}" for k in HEADLINE]
        if "zsl_map" in self.metrics:
            parts += [f"zsl_map {self.metrics['zsl_map']:.4f}", f"gzsl_map {self.metrics['gzsl_map']:.4f}"]
        return f"{self.split}: " + "  ".join(parts) + f"  ({int(self.metrics.get('n_images', 0))} images)"


def report(
    scored: Scored,
    taxonomy: Taxonomy,
    split: str,
    train_labels: np.ndarray | None = None,
    train_mask: np.ndarray | None = None,
) -> Report:
    """evaluate_all (+ ZSL/GZSL when the taxonomy has unseen labels with known positives here, + the
    label-prior baseline when training labels are given)."""
    full = metrics.evaluate_all(scored.scores, scored.labels, class_names=taxonomy.names, mask=scored.mask)
    per_class = full.pop("per_class_ap")
    out = {k: float(v) for k, v in full.items()}
    unseen = np.asarray(taxonomy.unseen_mask, dtype=bool)
    known_pos = scored.labels * scored.mask
    if unseen.any() and known_pos[:, unseen].any():
        zsl = metrics.zsl_gzsl(scored.scores, scored.labels, unseen, mask=scored.mask)
        out.update({k: float(v) for k, v in zsl.items()})
    if train_labels is not None:
        prior = metrics.label_prior_scores(train_labels, len(scored.scores), mask=train_mask)
        base = metrics.evaluate_all(prior, scored.labels, class_names=taxonomy.names, mask=scored.mask)
        out.update({f"baseline_{k}": float(base[k]) for k in HEADLINE})
    positives = dict(zip(taxonomy.names, (int(v) for v in known_pos.sum(axis=0)), strict=True))
    return Report(
        split=split,
        metrics=out,
        per_class_ap={k: float(v) for k, v in per_class.items()},
        n_positives=positives,
    )


def confused_pairs(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    thresholds: np.ndarray,
    names: Sequence[str],
    top: int = 20,
) -> pd.DataFrame:
    """Ordered label pairs (true, predicted): images where `true` is a positive, `predicted` is a known
    negative, yet `predicted` scores at or above its threshold. Most frequent first, with the rate over
    the positives of `true`."""
    pred = (scores >= thresholds[None, :]) & (mask > 0)  # [N, C]
    pos = (labels > 0) & (mask > 0)  # [N, C]
    false_pos = pred & ~pos  # [N, C]
    counts = pos.T.astype(np.int64) @ false_pos.astype(np.int64)  # [C_true, C_pred]
    np.fill_diagonal(counts, 0)
    n_pos = pos.sum(axis=0)
    rows = []
    for t, p in zip(*np.nonzero(counts), strict=True):
        rows.append(
            {
                "true_label": names[t],
                "predicted_label": names[p],
                "count": int(counts[t, p]),
                "rate": float(counts[t, p] / max(n_pos[t], 1)),
            }
        )
    frame = pd.DataFrame(rows, columns=["true_label", "predicted_label", "count", "rate"])
    return frame.sort_values(["count", "rate"], ascending=False).head(top).reset_index(drop=True)


def write_artifacts(
    folder: str,
    reports: Sequence[Report],
    scored: Scored,
    taxonomy: Taxonomy,
    thresholds: np.ndarray,
) -> list[str]:
    """Files for MLflow: per_class_ap.csv (one AP column per report), metrics.json, per_class_ap.png,
    pr_curves.png and confused_pairs.csv for `scored` (the first report's split), taxonomy.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ---- `mumic evaluate` -----------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    report: Report
    model_name: str
    model_version: str
    run_id: str | None
    unreadable: int


def evaluate(
    annotations_uri: str,
    model_ref: str,
    split: str = "test",
    *,
    experiment: str | None = "mumic-evaluate",
    tracking_uri: str | None = None,
    workdir: str | None = None,
    use_gpu: bool = False,
    batch_size: int = 64,
) -> EvaluationResult:
    """Score one split ('all' for every row) of an annotations file with a model reference and report
    mAP, GAP, GAP@10, F1@3/5, per-class AP, and ZSL/GZSL when the taxonomy has unseen labels (their
    truth is kept here). Logged to MLflow unless `experiment` is None."""
    import tempfile

    from mumic_core import checkpoint
    from mumic_core.splits import SPLITS

    from . import annotations, models, registry, storage, tracking, train_data

    uri = tracking_uri or tracking.tracking_uri(workdir)
    if str(model_ref).startswith("models:/"):
        mref = registry.resolve(model_ref, tracking_uri=uri)
    else:
        mref = models.resolve(model_ref)
    cfg = checkpoint.read_config(mref.uri)
    taxonomy = Taxonomy.from_dict(cfg["taxonomy"])
    everything = split in ("all", "*")
    ann = annotations.load(
        annotations_uri, taxonomy, drop_unseen=False, require=() if everything else (split,)
    )
    splits = tuple(s for s in SPLITS if ann.split_counts[s]) if everything else (split,)
    train_data.ensure_ray()
    pre = cfg["preprocessing"]
    decoded = train_data.decode_splits(ann, pre["image_size"], splits=splits, resize_mode=pre["resize_mode"])
    ds = None
    for s in decoded.datasets:
        ds = decoded.eval(s) if ds is None else ds.union(decoded.eval(s))
    scored = score_dataset(ds, mref.uri, use_gpu=use_gpu, batch_size=batch_size)
    rep = report(scored, taxonomy, split)
    run_id = None
    if experiment:
        c = tracking.client(uri)
        exp_id = tracking.ensure_experiment(c, experiment, tracking.default_artifact_location(uri, workdir))
        run = c.create_run(
            exp_id,
            run_name=f"evaluate {mref.name}/{mref.version} on {split}",
            tags={
                "mumic.kind": "evaluate",
                "mumic.model_name": mref.name,
                "mumic.model_version": mref.version,
            },
        )
        run_id = run.info.run_id
        tracking.log_params(
            c,
            run_id,
            {
                "model": storage.redact(model_ref),
                "model_name": mref.name,
                "model_version": mref.version,
                "annotations": annotations_uri,
                "split": split,
                "n_unreadable": decoded.n_errors,
            },
        )
        tracking.log_metrics(c, run_id, {**rep.metrics, "ap": rep.per_class_ap}, prefix=f"{split}_")
        with tempfile.TemporaryDirectory(prefix="mumic-eval-") as tmp:
            write_artifacts(tmp, [rep], scored, taxonomy, np.asarray(cfg["thresholds"], dtype=np.float32))
            c.log_artifacts(run_id, tmp, "evaluation")
        c.set_terminated(run_id, "FINISHED")
    return EvaluationResult(rep, mref.name, mref.version, run_id, decoded.n_errors)
