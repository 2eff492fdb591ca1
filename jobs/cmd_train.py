"""`mumic train`: Ray Train DDP fine-tuning from annotations; MLflow tracking; registers a version."""

from __future__ import annotations

import argparse
import json

from jobs.cli import EXIT_USAGE, UserError

NAME = "train"
HELP = "fine-tune a model on annotations with Ray Train (DDP), log to MLflow, register a version"
DESCRIPTION = (
    "Validate the annotations (unknown labels, duplicate ids, empty splits) before anything starts, decode "
    "the images with Ray Data, fine-tune with Ray Train on N workers (DDP: gloo on CPU, NCCL with --use-gpu), "
    "validate and checkpoint every epoch (the same --run-name again resumes), tune per-class thresholds, "
    "evaluate val/test, log everything to MLflow and register the best epoch as a new version of --register "
    "with alias 'candidate'. --batch-size is per worker."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--annotations", required=True, help="Parquet/CSV: image_id, uri, labels[, split, unknown_labels]"
    )
    data.add_argument("--taxonomy", required=True, help="YAML/JSON taxonomy file (local or s3://)")
    data.add_argument("--augment", help="none | flip | crop | flip,crop (default: flip)")
    data.add_argument(
        "--crop-scale-min", type=float, help="smallest random crop, as a fraction of the area (0.6)"
    )
    data.add_argument("--val-fraction", type=float, help="hash split for rows without `split` (0.15)")
    data.add_argument("--test-fraction", type=float, help="hash split for rows without `split` (0.15)")
    data.add_argument("--max-pixels", type=int, help="skip images larger than this (width*height)")

    model = p.add_argument_group("model")
    model.add_argument("--backbone", help="open_clip model name or architecture JSON (default: ViT-B-32)")
    model.add_argument("--pretrained", help="open_clip pretrained tag, or a local/s3:// checkpoint file")
    model.add_argument(
        "--train-mode", choices=("both", "image", "frozen"), help="what trains (default: both)"
    )
    model.add_argument("--init-tau", type=float, help="initial temperature (default: from the backbone)")
    model.add_argument(
        "--learn-tau", action=argparse.BooleanOptionalAction, default=None, help="learnable tau"
    )
    model.add_argument(
        "--use-bias", action=argparse.BooleanOptionalAction, default=None, help="learnable bias b"
    )

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="epochs (default: 10)")
    opt.add_argument("--batch-size", type=int, help="images per step per worker (default: 64)")
    opt.add_argument("--lr-image", type=float, help="image tower LR")
    opt.add_argument("--lr-text", type=float, help="text tower LR")
    opt.add_argument("--lr-head", type=float, help="tau / bias LR")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    opt.add_argument("--loss-weighting", choices=("none", "focal", "asymmetric", "class_frequency"))
    opt.add_argument("--focal-gamma", type=float)
    opt.add_argument("--seed", type=int)
    opt.add_argument(
        "--select-metric",
        choices=("map", "gap", "gap_at_10", "f1_at_3", "f1_at_5"),
        help="validation metric that picks the best checkpoint (default: gap_at_10)",
    )

    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, help="Ray Train workers (default: 1)")
    run.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL")
    run.add_argument(
        "--cpus-per-worker", type=float, help="default 1 (less when no CPU would be left for data)"
    )
    run.add_argument("--max-failures", type=int, help="worker failures to recover from (default: 2)")
    run.add_argument("--num-to-keep", type=int, help="checkpoints kept (best by --select-metric; default 2)")
    run.add_argument("--run-name", help="Ray Train / MLflow run name; the same name again resumes it")
    run.add_argument(
        "--storage-path", help="checkpoint storage, local or s3:// (default: WORKDIR/ray_results)"
    )
    run.add_argument(
        "--workdir", help="default folder for mlflow.db, artifacts and checkpoints (default: cwd)"
    )
    run.add_argument("--experiment", help="MLflow experiment (default: mumic)")
    run.add_argument("--artifact-location", help="artifact root of a new experiment (local or s3://)")
    run.add_argument("--register", help="registered model name (omit: do not register)")
    run.add_argument("--alias", help="alias set on the new version (default: candidate)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace):
    from pipelines.train import TrainConfig

    names = {f for f in TrainConfig.__dataclass_fields__} - {"fault", "tracking_uri"}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        return TrainConfig.from_dict(values)
    except ValueError as e:
        raise UserError(str(e), EXIT_USAGE) from None


def run(args: argparse.Namespace) -> int:
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    from pipelines.annotations import AnnotationError
    from pipelines.train import TrainError, train

    cfg = config_from_args(args)
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
        "val": {
            k: result.val.metrics[k]
            for k in ("map", "gap", "gap_at_10", "f1_at_3", "f1_at_5", "baseline_map")
        },
        "test": result.test.metrics if result.test else None,
        "unreadable_images": result.unreadable,
        "model": result.model_uri,
        "alias": result.alias,
        "seconds": round(result.seconds, 1),
    }
    if args.json:
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
