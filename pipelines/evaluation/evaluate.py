"""`mumic evaluate`: score one split of an annotations file with a model reference, report the metrics
and log them (with the artifacts) to MLflow."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np

from mumic_core import checkpoint
from mumic_core.splits import SPLITS
from mumic_core.taxonomy import Taxonomy

from .. import annotations, storage
from ..cluster import ensure_ray
from ..registry import resolve_model, tracking
from .artifacts import write_artifacts
from .report import Report, report
from .scoring import score_dataset


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
    precision: str = "auto",
) -> EvaluationResult:
    """Score one split ('all' for every row) of an annotations file with a model reference and report
    mAP, GAP, GAP@10, F1@3/5, per-class AP, and ZSL/GZSL when the taxonomy has unseen labels (their
    truth is kept here). Logged to MLflow unless `experiment` is None."""
    uri = tracking_uri or tracking.tracking_uri(workdir)
    mref = resolve_model(model_ref, tracking_uri=uri)
    cfg = checkpoint.read_config(mref.uri)
    taxonomy = Taxonomy.from_dict(cfg["taxonomy"])
    everything = split in ("all", "*")
    ann = annotations.load(
        annotations_uri, taxonomy, drop_unseen=False, require=() if everything else (split,)
    )
    splits = tuple(s for s in SPLITS if ann.split_counts[s]) if everything else (split,)
    ensure_ray()
    pre = cfg["preprocessing"]
    decoded = annotations.decode_splits(
        ann, pre["image_size"], splits=splits, resize_mode=pre["resize_mode"]
    )
    ds = None
    for s in decoded.datasets:
        ds = decoded.eval(s) if ds is None else ds.union(decoded.eval(s))
    scored = score_dataset(ds, mref.uri, use_gpu=use_gpu, batch_size=batch_size, precision=precision)
    rep = report(scored, taxonomy, split)
    run_id = None
    if experiment:
        params = {
            "model": storage.redact(model_ref),
            "model_name": mref.name,
            "model_version": mref.version,
            "annotations": annotations_uri,
            "split": split,
            "precision": precision,
            "n_unreadable": decoded.n_errors,
        }
        thresholds = np.asarray(cfg["thresholds"], dtype=np.float32)
        run_id = _log_evaluation(uri, workdir, experiment, mref, params, rep, scored, taxonomy, thresholds)
    return EvaluationResult(rep, mref.name, mref.version, run_id, decoded.n_errors)


def _log_evaluation(uri, workdir, experiment, mref, params, rep, scored, taxonomy, thresholds) -> str:
    """One MLflow run: the inputs as params, the metrics (per-class AP too) and the artifacts."""
    c = tracking.client(uri)
    exp_id = tracking.ensure_experiment(c, experiment, tracking.default_artifact_location(uri, workdir))
    run = c.create_run(
        exp_id,
        run_name=f"evaluate {mref.name}/{mref.version} on {rep.split}",
        tags={"mumic.kind": "evaluate", "mumic.model_name": mref.name, "mumic.model_version": mref.version},
    )
    run_id = run.info.run_id
    tracking.log_params(c, run_id, params)
    tracking.log_metrics(c, run_id, {**rep.metrics, "ap": rep.per_class_ap}, prefix=f"{rep.split}_")
    with tempfile.TemporaryDirectory(prefix="mumic-eval-") as tmp:
        write_artifacts(tmp, [rep], scored, taxonomy, thresholds)
        c.log_artifacts(run_id, tmp, "evaluation")
    c.set_terminated(run_id, "FINISHED")
    return run_id
