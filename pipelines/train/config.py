"""What a training run is told (`TrainConfig`, logged whole to MLflow) and what it gives back (`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mumic_core.images import DEFAULT_MAX_PIXELS
from mumic_core.metrics import HEADLINE
from mumic_core.training import OptimConfig

from ..annotations import Augment
from ..evaluation import Report

SELECT_METRICS = HEADLINE


class TrainError(RuntimeError):
    """Training could not finish (one line, e.g. workers kept failing past FailureConfig.max_failures)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; logged whole to MLflow as params. `batch_size` is per worker."""

    annotations: str = ""
    taxonomy: str = ""
    backbone: str = "ViT-B-32"
    pretrained: str | None = None
    train_mode: str = "both"  # both | image | frozen (methods.md §1)
    learn_tau: bool = True
    init_tau: float | None = None
    use_bias: bool = True
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1, or less so that one CPU stays free for Ray Data
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 128
    lr_image: float = OptimConfig.lr_image
    lr_text: float = OptimConfig.lr_text
    lr_head: float = OptimConfig.lr_head
    weight_decay: float = OptimConfig.weight_decay
    warmup_steps: int = OptimConfig.warmup_steps
    grad_clip: float = OptimConfig.grad_clip
    loss_weighting: str = OptimConfig.loss_weighting
    focal_gamma: float = OptimConfig.focal_gamma
    seed: int = OptimConfig.seed
    augment: str = "flip"  # none | flip | crop | flip,crop
    crop_scale_min: float = 0.6
    resize_mode: str = "shortest"
    max_pixels: int = DEFAULT_MAX_PIXELS
    val_fraction: float = 0.15  # hash split, used only for rows without a `split`
    test_fraction: float = 0.15
    select_metric: str = "gap_at_10"  # best checkpoint = highest validation value of this
    num_to_keep: int = 2
    max_failures: int = 2
    find_unused_parameters: bool = False
    experiment: str = "mumic"
    run_name: str | None = None  # the same name again resumes (Ray checkpoints and the MLflow run)
    register: str | None = None  # registered model name; None: do not register
    alias: str = "candidate"
    workdir: str = "."
    storage_path: str | None = None  # Ray Train checkpoints; default <workdir>/ray_results; may be s3://
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite <workdir>/mlflow.db
    artifact_location: str | None = None  # for a new experiment; default <workdir>/mlartifacts (local stores)
    fault: dict | None = None  # tests only: {"rank", "epoch", "marker"} makes that rank exit once

    def __post_init__(self) -> None:
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(
                f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {self.select_metric!r}"
            )
        if self.workers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("workers, epochs and batch_size must be at least 1")
        Augment.parse(self.augment, self.crop_scale_min)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def optim(self) -> OptimConfig:
        names = {f.name for f in fields(OptimConfig)}
        return OptimConfig(**{k: v for k, v in self.to_dict().items() if k in names})

    def loggable(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in ("fault", "tracking_uri")}


@dataclass
class TrainResult:
    run_name: str
    run_id: str
    tracking_uri: str
    epochs: int  # completed
    best_epoch: int
    model_dir: str  # the best checkpoint's model folder (local path or s3://)
    val: Report
    test: Report | None
    model_name: str | None = None
    model_version: str | None = None
    alias: str | None = None
    unreadable: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_s: float = 0.0  # training throughput over all epochs (all workers)

    @property
    def model_uri(self) -> str | None:
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else None
