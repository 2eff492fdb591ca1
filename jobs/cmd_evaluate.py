"""`mumic evaluate`: metrics of a model on (a split of) an annotations file, printed and logged to MLflow."""

from __future__ import annotations

import argparse
import json
import math

from jobs.cli import UserError

NAME = "evaluate"
HELP = (
    "score annotated images with a model: mAP, GAP, GAP@10, F1@3/5, per-class AP (ZSL/GZSL if unseen labels)"
)
DESCRIPTION = (
    "Score one split of an annotations file (train/val/test from its `split` column or the hash split; 'all' "
    "for every row) with a model reference, print the metrics and log them to MLflow (experiment "
    "'mumic-evaluate'). Labels marked unseen in the model's taxonomy keep their truth here, so ZSL and GZSL "
    "metrics are reported when the split has unseen positives."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--annotations", required=True, help="Parquet/CSV: image_id, uri, labels[, split, unknown_labels]"
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model folder"
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"), help="default: test")
    p.add_argument("--experiment", default="mumic-evaluate", help="MLflow experiment ('' to skip logging)")
    p.add_argument("--workdir", help="folder of the default mlflow.db (default: cwd)")
    p.add_argument("--use-gpu", action="store_true", help="score on a GPU")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    from pipelines.annotations import AnnotationError
    from pipelines.evaluation import evaluate

    try:
        res = evaluate(
            args.annotations,
            args.model,
            args.split,
            experiment=args.experiment or None,
            workdir=args.workdir,
            use_gpu=args.use_gpu,
            batch_size=args.batch_size,
        )
    except AnnotationError as e:
        raise UserError(str(e)) from None
    rep = res.report
    if args.json:
        print(
            json.dumps(
                {
                    "model": f"{res.model_name}/{res.model_version}",
                    "split": rep.split,
                    "metrics": rep.metrics,
                    "per_class_ap": rep.per_class_ap,
                    "mlflow_run_id": res.run_id,
                },
                indent=2,
                default=float,
            )
        )
        return 0
    print(f"model {res.model_name} version {res.model_version}")
    print(rep.headline())
    for key in ("zsl_map", "zsl_f1_at_3", "gzsl_map", "gzsl_f1_at_3"):
        if key in rep.metrics:
            print(f"{key} {rep.metrics[key]:.4f}")
    width = max(len(n) for n in rep.per_class_ap)
    for name, ap in rep.per_class_ap.items():
        shown = "   n/a" if math.isnan(ap) else f"{ap:.4f}"
        print(f"  {name:<{width}}  AP {shown}  ({rep.n_positives.get(name, 0)} positives)")
    if res.unreadable:
        print(f"{res.unreadable} unreadable images skipped")
    if res.run_id:
        print(f"logged to MLflow run {res.run_id}")
    return 0
