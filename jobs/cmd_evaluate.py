"""`mumic evaluate`: metrics of a model on (a split of) an annotations file, printed and logged to MLflow."""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.errors import UserError
from jobs.options import WORKDIR_HELP, json_field, model_field

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


@dataclass(frozen=True)
class EvaluateArgs:
    """Which images (a split of an annotations file), which model, and where the run is logged."""

    model: str = model_field()
    annotations: str = Field(description="Parquet/CSV: image_id, uri, labels[, split, unknown_labels]")
    split: Literal["train", "val", "test", "all"] = Field("test", description="which rows to score")
    experiment: str = Field("mumic-evaluate", description="MLflow experiment ('' to skip logging)")
    workdir: str | None = Field(None, description=WORKDIR_HELP)
    use_gpu: bool = Field(False, description="score on a GPU")
    batch_size: int = Field(64, ge=1, description="images per model call")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="number format of the image tower: fp32, bf16 (autocast) or int8 (dynamic quantisation, "
        "CPU only); the head stays fp32. auto: bf16 on a GPU, fp32 on a CPU",
    )
    json: bool = json_field("the metrics")


def options() -> tuple[type, ...]:
    return (EvaluateArgs,)


def run(args: EvaluateArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
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
            precision=args.precision,
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
                    "precision": args.precision,
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
