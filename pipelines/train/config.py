"""What a training run is told (`TrainConfig`, logged whole to MLflow) and what it gives back (`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from mumic_core.heads import HEAD_NAMES, ClipDecoderOptions, MKTOptions, head_class
from mumic_core.images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from mumic_core.metrics import HEADLINE
from mumic_core.training import OptimConfig, stage_schedule

from ..annotations import Augment
from ..evaluation import Report

SELECT_METRICS = HEADLINE


class TrainError(RuntimeError):
    """Training could not finish (one line, e.g. workers kept failing past FailureConfig.max_failures)."""


_CLI_REQUIRED = {"cli": {"required": True}}  # `mumic train` needs it (see jobs/options.py)
_NOT_AN_OPTION = {"cli": {"hidden": True}}


@pydantic_dataclass
class TrainConfig:
    """Everything a training run depends on; logged whole to MLflow as params. `batch_size` is per worker.

    The one source of the `mumic train` options and of the keys of its YAML job config (jobs/options.py):
    a value from either, or from code, is checked by the same validation (pydantic).
    """

    annotations: str = Field(
        "",
        description="Parquet/CSV: image_id, uri, labels[, split, unknown_labels]",
        json_schema_extra=_CLI_REQUIRED,
    )
    taxonomy: str = Field(
        "", description="YAML/JSON taxonomy file (local or s3://)", json_schema_extra=_CLI_REQUIRED
    )
    backbone: str = Field("ViT-B-32", description="open_clip model name or architecture JSON")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag, or a local/s3:// checkpoint file"
    )
    init: str | None = Field(
        None,
        description="warm start from a saved model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH "
        "or a model folder (its backbone, head and weights; the taxonomy may add or drop labels)",
    )
    train_mode: Literal["both", "image", "frozen"] = Field("both", description="what trains (methods.md §1)")
    learn_tau: bool = Field(True, description="learnable tau")
    init_tau: float | None = Field(
        None, gt=0, description="initial temperature (default: from the backbone)"
    )
    use_bias: bool = Field(True, description="learnable bias b")
    # the head (mumic_core.heads; methods.md §1-3) and its options: `<prefix><option>` sets that option
    head: Literal[HEAD_NAMES] = Field("mumic", description="scoring head: mumic | clip_decoder | mkt")
    stage: int | None = Field(
        None, ge=1, le=2, description="train only this stage (mkt: 1 image side, 2 prompt tuning of the "
        "--init stage-1 model); default: every stage of the head, in order"
    )
    stage2_epochs: int | None = Field(None, ge=1, description="epochs of stage 2 after stage 1 (mkt; default: --epochs)")
    decoder_alpha: float = Field(ClipDecoderOptions.alpha, ge=0, description="clip_decoder: weight α of L_clip")
    decoder_beta: float = Field(ClipDecoderOptions.beta, ge=0, description="clip_decoder: weight β of ASL")
    decoder_tau: float = Field(ClipDecoderOptions.tau, gt=0, description="clip_decoder: temperature τ of L_clip")
    mkt_top_k: int = Field(MKTOptions.top_k, ge=1, description="mkt: patches averaged in the local score")
    mkt_distill_weight: float = Field(MKTOptions.distill_weight, ge=0, description="mkt stage 1: weight of L_dist")
    mkt_layer_decay: float = Field(
        MKTOptions.layer_decay, gt=0, le=1, description="mkt stage 1: layer-wise LR decay per block"
    )
    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs (and torch threads) per worker (default: on one node, the node's CPUs less one for "
        "data, shared by the workers; on several nodes or a GPU, 1)",
    )
    epochs: int = Field(10, ge=1, description="epochs")
    batch_size: int = Field(
        64,
        ge=1,
        description="images per step per worker (the default suits a CPU; on a GPU, larger, as many as "
        "fit: in train_mode both every step runs the text tower over all the taxonomy's prompts, whatever "
        "the batch)",
    )
    eval_batch_size: int = Field(128, ge=1, description="images per model call when evaluating")
    lr_image: float = Field(OptimConfig.lr_image, gt=0, description="image tower LR")
    lr_text: float = Field(OptimConfig.lr_text, gt=0, description="text tower LR")
    lr_head: float = Field(OptimConfig.lr_head, gt=0, description="tau / bias LR")
    weight_decay: float = Field(OptimConfig.weight_decay, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(OptimConfig.warmup_steps, ge=0, description="linear LR warm-up steps")
    grad_clip: float = Field(OptimConfig.grad_clip, ge=0, description="max gradient norm (0: off)")
    loss_weighting: Literal["none", "focal", "asymmetric", "class_frequency"] = Field(
        OptimConfig.loss_weighting, description="how the per-label loss is weighted"
    )
    focal_gamma: float = Field(
        OptimConfig.focal_gamma, ge=0, description="focusing exponent of the focal loss"
    )
    seed: int = Field(OptimConfig.seed, description="seed of initialisation, shuffling and augmentation")
    augment: str = Field("flip", description="none | flip | crop | flip,crop")
    crop_scale_min: float = Field(
        0.6, gt=0, le=1, description="smallest random crop, as a fraction of the area"
    )
    resize_mode: Literal[RESIZE_MODES] = Field(
        "shortest", description="how images are fitted to the model's input size"
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="skip images larger than this (width*height)"
    )
    val_fraction: float = Field(
        0.15, ge=0, lt=1, description="hash split fraction, used only for rows without a `split`"
    )
    test_fraction: float = Field(
        0.15, ge=0, lt=1, description="hash split fraction, used only for rows without a `split`"
    )
    select_metric: Literal[SELECT_METRICS] = Field(
        "gap_at_10", description="validation metric that picks the best checkpoint"
    )
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept (the best by select_metric)")
    max_failures: int = Field(2, ge=-1, description="worker failures to recover from (-1: no limit)")
    find_unused_parameters: bool = Field(False, description="DDP find_unused_parameters")
    experiment: str = Field("mumic", description="MLflow experiment")
    run_name: str | None = Field(
        None, description="Ray Train / MLflow run name (default: new); the same name again resumes it"
    )
    register: str | None = Field(None, description="registered model name (omit: do not register)")
    alias: str = Field("candidate", description="alias set on the new version")
    workdir: str = Field(".", description="default folder for mlflow.db, artifacts and checkpoints")
    storage_path: str | None = Field(
        None, description="Ray Train checkpoint storage, local or s3:// (default: WORKDIR/ray_results)"
    )
    tracking_uri: str | None = Field(  # default: MLFLOW_TRACKING_URI, else sqlite <workdir>/mlflow.db
        None, json_schema_extra=_NOT_AN_OPTION
    )
    artifact_location: str | None = Field(
        None, description="artifact root of a new experiment, local or s3:// (default: WORKDIR/mlartifacts)"
    )
    fault: dict | None = Field(  # tests only: {"rank", "epoch", "marker"} makes that rank exit once
        None, json_schema_extra=_NOT_AN_OPTION
    )

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, value: str) -> str:
        Augment.parse(value)
        return value

    @model_validator(mode="after")
    def _stage_of_the_head(self) -> TrainConfig:
        self.stages()  # a stage the head does not have is refused with the other bad values
        first = head_class(self.head).stages[0]
        if self.stage not in (None, first) and not self.init:
            raise ValueError(f"--stage {self.stage} continues a model of the earlier stage: name it with --init")
        return self

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

    def model_options(self) -> dict[str, Any]:
        """What `MuMIC.create` takes from this config (the backbone, its weights and the head)."""
        names = ("backbone", "pretrained", "train_mode", "learn_tau", "init_tau", "use_bias", "resize_mode")
        head_options = head_class(self.head).Options.from_train(self.to_dict())
        return {**{k: getattr(self, k) for k in names}, "head": self.head, "head_options": head_options}

    def stages(self) -> list[int]:
        """The stage of every epoch (one stage for most heads; mkt: stage 1, then stage 2)."""
        return stage_schedule(head_class(self.head).stages, self.stage, self.epochs, self.stage2_epochs)

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
