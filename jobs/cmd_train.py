"""`mumic train`: Ray Train DDP fine-tuning from annotations; MLflow tracking; registers a version."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic.dataclasses import dataclass

from jobs.errors import UserError
from jobs.options import json_field

if TYPE_CHECKING:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.train import TrainConfig

NAME = "train"
HELP = "fine-tune a model on annotations with Ray Train (DDP), log to MLflow, register a version"
DESCRIPTION = (
    "Validate the annotations (unknown labels, duplicate ids, empty splits) before anything starts, decode "
    "the images with Ray Data, fine-tune with Ray Train on N workers (DDP: gloo on CPU, NCCL with --use-gpu), "
    "validate and checkpoint every epoch (the same --run-name again resumes), tune per-class thresholds, "
    "evaluate val/test, log everything to MLflow and register the best epoch as a new version of --register "
    "with alias 'candidate'. --batch-size is per worker."
)


GROUPS = {  # how `mumic train --help` lists the options of TrainConfig
    "data": (
        "annotations", "taxonomy", "augment", "crop_scale_min", "resize_mode", "val_fraction", "test_fraction",
        "max_pixels",
    ),
    "model": ("backbone", "pretrained", "train_mode", "init_tau", "learn_tau", "use_bias"),
    "head": (
        "head", "stage", "stage2_epochs", "decoder_alpha", "decoder_beta", "decoder_tau", "mkt_top_k",
        "mkt_distill_weight", "mkt_layer_decay",
    ),
    "optimisation": (
        "epochs", "batch_size", "eval_batch_size", "lr_image", "lr_text", "lr_head", "weight_decay",
        "warmup_steps", "grad_clip", "loss_weighting", "focal_gamma", "seed", "select_metric",
    ),
    "run": (
        "workers", "use_gpu", "cpus_per_worker", "max_failures", "num_to_keep", "find_unused_parameters",
        "run_name", "storage_path", "workdir", "experiment", "artifact_location", "register", "alias", "json",
    ),
}


@dataclass(frozen=True)
class TrainOutput:
    json: bool = json_field("the summary")


def options() -> tuple[type, ...]:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.train.config import TrainConfig

    return (TrainConfig, TrainOutput)


def run(cfg: TrainConfig, out: TrainOutput) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from mumic_core.metrics import HEADLINE
    from pipelines.annotations import AnnotationError
    from pipelines.train import TrainError, train

    try:
        result = train(cfg)
    except (AnnotationError, TrainError) as e:
        raise UserError(str(e)) from None
    summary = {
        "run_name": result.run_name,
        "mlflow_run_id": result.run_id,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "model_dir": result.model_dir,
        "val": {k: result.val.metrics[k] for k in (*HEADLINE, "baseline_map")},
        "test": result.test.metrics if result.test else None,
        "unreadable_images": result.unreadable,
        "model": result.model_uri,
        "alias": result.alias,
        "seconds": round(result.seconds, 1),
    }
    if out.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    print(result.val.headline())
    if result.test:
        print(result.test.headline())
    print(f"label-prior baseline (val): map {result.val.metrics['baseline_map']:.4f}")
    print(f"best epoch {result.best_epoch} of {result.epochs}; model folder {result.model_dir}")
    if result.model_version:
        print(f"registered models:/{result.model_name}/{result.model_version} (alias {result.alias!r})")
        print(f"next: mumic promote --name {result.model_name} --version {result.model_version}")
    return 0
