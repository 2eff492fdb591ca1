"""Retraining: Ray Train DDP fine-tuning from annotations, per-epoch validation and checkpoints, then
evaluation, MLflow tracking and registration from the driver.

    driver: annotations → validate → decode (Ray Data) → TorchTrainer.fit() → best checkpoint
            → evaluate val/test → artifacts → register version (alias `candidate`)
    worker: model → [resume from checkpoint] → per epoch: train steps on its shard → validate (sharded,
            gathered) → tune thresholds → checkpoint (rank 0) → ray.train.report

The optimisation itself is `mumic_core.training` (make_optimizer, lr_factor, train_step), the same code the
plain single-process loop runs. Checkpoints are safetensors + JSON: model folder, optimizer state, epoch.
Registration happens once, on the driver, after fit: a worker restart cannot register twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from mumic_core import checkpoint, metrics
from mumic_core.images import DEFAULT_MAX_PIXELS
from mumic_core.model import MuMIC, resolve_arch
from mumic_core.taxonomy import Taxonomy
from mumic_core.training import OptimConfig, lr_factor, make_optimizer, set_lr, train_step

from . import annotations, evaluation, registry, storage, tracking, train_data

log = logging.getLogger(__name__)

SELECT_METRICS = ("map", "gap", "gap_at_10", "f1_at_3", "f1_at_5")
MODEL_DIR, OPTIM_WEIGHTS, OPTIM_META, STATE = (
    "model",
    "optimizer.safetensors",
    "optimizer.json",
    "train_state.json",
)


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
        train_data.Augment.parse(self.augment, self.crop_scale_min)

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
    val: evaluation.Report
    test: evaluation.Report | None
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


# ---- checkpoint state (safetensors + JSON; nothing pickled) ---------------------------------------------


def save_state(folder: str, model: MuMIC, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    checkpoint.save(model, os.path.join(folder, MODEL_DIR), extra={"epoch": state["epoch"]})
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, os.path.join(folder, OPTIM_WEIGHTS))
    with open(os.path.join(folder, OPTIM_META), "w") as f:
        json.dump({"param_groups": sd["param_groups"], "scalars": scalars}, f)
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump(state, f)


def load_state(folder: str, model: MuMIC, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, MODEL_DIR, checkpoint.WEIGHTS))
    model.load_state_dict(weights, strict=True)
    with open(os.path.join(folder, OPTIM_META)) as f:
        meta = json.load(f)
    state: dict[int, dict] = {}
    for key, value in {**load_file(os.path.join(folder, OPTIM_WEIGHTS)), **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    with open(os.path.join(folder, STATE)) as f:
        return json.load(f)


# ---- the worker loop -------------------------------------------------------------------------------------


def _owner(image_id: str, world: int) -> int:
    """Which rank scores a validation row: by id, so it does not depend on the order rows arrive in."""
    return zlib.crc32(str(image_id).encode()) % world


def _validate(model: MuMIC, shard, rank: int, world: int, batch_size: int, group) -> tuple[np.ndarray, ...]:
    """Each rank scores its share of the (unsplit) validation stream; rank 0 gets all, sorted by id."""
    import torch.distributed as dist

    model.eval()
    ids, scores, labels, masks = [], [], [], []
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            mine = np.array([_owner(i, world) == rank for i in batch["image_id"]], dtype=bool)
            if not mine.any():
                continue
            ids.append(batch["image_id"][mine].astype(str))
            scores.append(model(batch["image"][mine])["probs"].float().cpu().numpy())
            labels.append(batch["labels"][mine])
            masks.append(batch["mask"][mine])
    model.train()
    c = len(model.taxonomy)
    part = (
        np.concatenate(ids) if ids else np.zeros(0, str),
        np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
        np.concatenate(labels) if labels else np.zeros((0, c), np.uint8),
        np.concatenate(masks) if masks else np.zeros((0, c), np.uint8),
    )
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, part, group=group)
        part = tuple(np.concatenate([g[k] for g in gathered]) for k in range(4))
    order = np.argsort(part[0], kind="stable")
    return tuple(a[order] for a in part)


def _maybe_fault(fault: dict | None, rank: int, epoch: int, step_in_epoch: int) -> None:
    """Test hook: the chosen rank dies (no cleanup, like a lost node) once, mid-epoch."""
    if not fault or rank != int(fault.get("rank", 1)) or epoch + 1 != int(fault.get("epoch", 2)):
        return
    if step_in_epoch != int(fault.get("step", 1)) or os.path.exists(fault["marker"]):
        return
    with open(fault["marker"], "w") as f:
        f.write(f"rank {rank} exited in epoch {epoch + 1}\n")
    print(f"[mumic train] fault injection: rank {rank} exits in epoch {epoch + 1}", flush=True)
    os._exit(1)


def train_loop_per_worker(config: dict) -> dict | None:
    """The function every Ray Train worker runs (DDP over gloo on CPU, NCCL on GPU)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainConfig.from_dict(config["train"])
    taxonomy = Taxonomy.from_dict(config["taxonomy"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["threads"]))
    device = ray.train.torch.get_device()
    autocast = "cuda" if device.type == "cuda" else None
    to_device = {"device": device} if device.type == "cuda" else {}

    torch.manual_seed(cfg.seed)
    model = MuMIC.create(
        taxonomy,
        backbone=cfg.backbone,
        pretrained=cfg.pretrained,
        train_mode=cfg.train_mode,
        learn_tau=cfg.learn_tau,
        init_tau=cfg.init_tau,
        use_bias=cfg.use_bias,
        resize_mode=cfg.resize_mode,
    ).to(device)
    optim_cfg = cfg.optim()
    optimizer = make_optimizer(model, optim_cfg)
    state: dict = {"epoch": 0, "step": 0, "history": []}
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            state = load_state(folder, model, optimizer)
        if rank == 0:
            print(f"[mumic train] resuming after epoch {state['epoch']} (step {state['step']})", flush=True)
    class_weights = None
    if config.get("class_weights") is not None:
        class_weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    # DDP broadcasts rank 0's weights here; buffers (thresholds) never change in training: no per-step sync.
    ddp = ray.train.torch.prepare_model(
        model,
        move_to_device=False,
        parallel_strategy_kwargs={
            "find_unused_parameters": cfg.find_unused_parameters,
            "broadcast_buffers": False,
        },
    )
    group = None
    if world > 1 and dist.get_backend() != "gloo":
        group = dist.new_group(backend="gloo")  # gather validation results on CPU, whatever the backend
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    total_steps = int(config["steps_per_epoch"]) * cfg.epochs
    names = taxonomy.names

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, n_samples = 0.0, 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=4 * cfg.batch_size, **to_device
        )
        for i, batch in enumerate(batches):
            _maybe_fault(cfg.fault, rank, epoch, i)
            set_lr(optimizer, lr_factor(state["step"], total_steps, cfg.warmup_steps))
            loss = train_step(
                ddp,
                optimizer,
                batch["image"],
                batch["labels"],
                batch["mask"],
                optim_cfg,
                class_weights,
                autocast,
            )
            loss_sum += loss * len(batch["image"])
            n_samples += len(batch["image"])
            state["step"] += 1
        train_seconds = time.perf_counter() - t0

        ids, scores, labels, mask = _validate(model, val_shard, rank, world, cfg.eval_batch_size, group)
        state["epoch"] = epoch + 1
        report: dict[str, Any] = {}
        if rank == 0:
            full = metrics.evaluate_all(scores, labels, class_names=names, mask=mask)
            model.set_thresholds(metrics.tune_thresholds(scores, labels, mask=mask))
            report = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(n_samples, 1),
                "train_samples": n_samples * world,
                "train_seconds": train_seconds,
                "samples_per_s": n_samples * world / max(train_seconds, 1e-9),
                "tau": model.tau,
                **{f"val_{k}": float(v) for k, v in full.items() if k != "per_class_ap"},
                "val_per_class_ap": full["per_class_ap"],
            }
            selected = report[f"val_{cfg.select_metric}"]
            report["score"] = selected if math.isfinite(selected) else -1.0  # Ray ranks checkpoints by it
            report["epoch_seconds"] = time.perf_counter() - t0
            state["history"].append({k: v for k, v in report.items() if k != "val_per_class_ap"})
        with tempfile.TemporaryDirectory(prefix="mumic-ckpt-") as folder:
            if rank == 0:
                save_state(folder, model, optimizer, state)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report({}, checkpoint=None)
    return {"history": state["history"]} if rank == 0 else None


# ---- the driver ------------------------------------------------------------------------------------------


def _cpus_per_worker(cfg: TrainConfig) -> float:
    """1 CPU per worker, less when that would leave no CPU for the Ray Data tasks that feed them."""
    import ray

    if cfg.cpus_per_worker:
        return float(cfg.cpus_per_worker)
    total = float(ray.cluster_resources().get("CPU", 1))
    if cfg.use_gpu or total - cfg.workers >= 1:
        return 1.0
    per = (total - 1) / cfg.workers
    if per < 0.05:
        raise TrainError(f"{cfg.workers} workers do not fit on {total:g} CPUs with one left for data loading")
    return round(per, 3)


def _checkpoint_uri(ckpt) -> str:
    """A Ray Checkpoint's location as a URI any process can read (s3://… or a local path)."""
    fs_type = getattr(ckpt.filesystem, "type_name", "local")
    return ckpt.path if fs_type == "local" else f"{fs_type}://{ckpt.path}"


def _best(result, key: str):
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if c is not None]
    if not candidates:
        raise TrainError("training finished without a checkpoint")

    def score(item) -> tuple[float, int]:
        value = item[1].get(key, float("nan"))
        return (
            value if isinstance(value, int | float) and math.isfinite(value) else -math.inf,
            -int(item[1]["epoch"]),
        )

    return max(candidates, key=score)


def _say(msg: str) -> None:
    print(f"[mumic train] {msg}", flush=True)


def build_trainer(
    cfg: TrainConfig,
    taxonomy: Taxonomy,
    datasets: dict,
    steps_per_epoch: int,
    *,
    run_name: str,
    storage_path: str,
    cpus_per_worker: float,
    callbacks: list | None = None,
    class_weights: list[float] | None = None,
):
    """The TorchTrainer of a run: `datasets` = {"train": per-epoch stream, "val": readable rows (not split)}."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "taxonomy": taxonomy.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "threads": max(1, int(cpus_per_worker)),
            "class_weights": class_weights,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Validate annotations, fine-tune with Ray Train, evaluate, log to MLflow, register (if asked)."""
    started = time.perf_counter()
    workdir = os.path.abspath(cfg.workdir)
    taxonomy = Taxonomy.load(cfg.taxonomy)
    ann = annotations.load(
        cfg.annotations,
        taxonomy,
        drop_unseen=True,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    image_size = _image_size(cfg.backbone)
    augment = train_data.Augment.parse(cfg.augment, cfg.crop_scale_min)
    run_name = cfg.run_name or time.strftime("mumic-%Y%m%d-%H%M%S", time.gmtime())
    storage_path = cfg.storage_path or os.path.join(workdir, "ray_results")
    uri = cfg.tracking_uri or tracking.tracking_uri(workdir)

    train_data.ensure_ray()
    decoded = _decode(cfg, ann, taxonomy, image_size)
    for split in ("train", "val"):
        if decoded.counts.get(split, 0) == 0:
            raise annotations.AnnotationError(f"{ann.source}: no readable images in split {split!r}")
    train_ann = ann.split("train").without(decoded.errors["image_id"])
    train_labels, train_mask = train_ann.label_matrix(), train_ann.known_mask()

    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(
        c, cfg.experiment, cfg.artifact_location or tracking.default_artifact_location(uri, workdir)
    )
    run_id, resumed = tracking.start_run(c, experiment_id, run_name, tags={"mumic.kind": "train"})
    _say(
        f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment {cfg.experiment!r} at {storage.redact(uri)}"
    )
    cpus = _cpus_per_worker(cfg)
    steps_per_epoch = math.ceil((decoded.counts["train"] // cfg.workers) / cfg.batch_size)
    _log_inputs(
        c,
        run_id,
        cfg,
        taxonomy,
        decoded,
        run_name=run_name,
        storage_path=storage_path,
        image_size=image_size,
        cpus_per_worker=cpus,
        steps_per_epoch=steps_per_epoch,
    )

    class_weights = None
    if cfg.loss_weighting == "class_frequency":
        from mumic_core.losses import class_frequency_weights

        class_weights = class_frequency_weights(
            torch.as_tensor(train_labels), torch.as_tensor(train_mask)
        ).tolist()
    trainer = build_trainer(
        cfg,
        taxonomy,
        {"train": decoded.train(augment), "val": decoded.eval("val")},
        steps_per_epoch,
        run_name=run_name,
        storage_path=storage_path,
        cpus_per_worker=cpus,
        callbacks=[tracking.EpochLogger(uri, run_id, cfg.epochs)],
        class_weights=class_weights,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: one line, the run marked failed
        c.set_terminated(run_id, "FAILED")
        raise TrainError(f"training run {run_name!r} failed: {_one_line(e)}") from e

    best, best_metrics = _best(result, "score")
    with (result.checkpoint or best).as_directory() as folder, open(os.path.join(folder, STATE)) as f:
        history = json.load(f)["history"]
    model_dir = f"{_checkpoint_uri(best).rstrip('/')}/{MODEL_DIR}"
    _say(
        f"best epoch {best_metrics['epoch']} (val {cfg.select_metric} {best_metrics[f'val_{cfg.select_metric}']:.4f}): {model_dir}"
    )

    reports, scored_by_split = _evaluate(decoded, ann, model_dir, taxonomy, train_labels, train_mask, cfg)
    val_report = reports["val"]
    _say(
        f"val mAP {val_report.metrics['map']:.4f} vs label-prior baseline {val_report.metrics['baseline_map']:.4f}"
    )
    for s, r in reports.items():  # per-epoch metrics own the `val_` names: the final ones are `best_val_`
        prefix = "best_val_" if s == "val" else f"{s}_"
        tracking.log_metrics(
            c, run_id, {**r.metrics, "ap": r.per_class_ap}, step=int(best_metrics["epoch"]), prefix=prefix
        )
    thresholds = np.asarray(checkpoint.read_config(model_dir)["thresholds"], dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="mumic-report-") as tmp:
        evaluation.write_artifacts(tmp, list(reports.values()), scored_by_split["val"], taxonomy, thresholds)
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f, indent=2)
        c.log_artifacts(run_id, tmp, "evaluation")

    samples = sum(h.get("train_samples", 0) for h in history)
    seconds = sum(h.get("train_seconds", 0.0) for h in history)
    out = TrainResult(
        run_name=run_name,
        run_id=run_id,
        tracking_uri=uri,
        epochs=len(history),
        best_epoch=int(best_metrics["epoch"]),
        model_dir=model_dir,
        val=val_report,
        test=reports.get("test"),
        unreadable=decoded.n_errors,
        history=history,
        samples_per_s=samples / seconds if seconds else 0.0,
    )
    if cfg.register:
        held_out = reports.get("test", val_report)
        out.model_version = registry.log_model_version(
            model_dir,
            cfg.register,
            run_id,
            tracking_uri=uri,
            alias=cfg.alias,
            metrics={k: v for k, v in held_out.metrics.items() if not k.startswith("baseline_")},
            eval_split=held_out.split,
            tags={"run_name": run_name, "best_epoch": str(out.best_epoch)},
        )
        out.model_name, out.alias = cfg.register, cfg.alias
        _say(f"registered {cfg.register} version {out.model_version} with alias {cfg.alias!r}")
    c.set_terminated(run_id, "FINISHED")
    out.seconds = time.perf_counter() - started
    return out


def _log_inputs(c, run_id: str, cfg: TrainConfig, taxonomy: Taxonomy, decoded, **derived) -> None:
    """The whole config and what was derived from it as params; the taxonomy and unreadable images as files."""
    tracking.log_params(
        c,
        run_id,
        {
            **cfg.loggable(),
            **derived,
            "global_batch_size": cfg.batch_size * cfg.workers,
            "taxonomy_sha256": taxonomy.sha256,
            "n_labels": len(taxonomy),
            "n_unseen_labels": sum(taxonomy.unseen_mask),
            **{f"n_{s}": n for s, n in decoded.counts.items()},
            "n_unreadable": decoded.n_errors,
        },
    )
    with tempfile.TemporaryDirectory(prefix="mumic-inputs-") as tmp:
        with open(os.path.join(tmp, "taxonomy.json"), "w") as f:
            json.dump(taxonomy.to_dict(), f, indent=2)
        if decoded.n_errors:
            decoded.errors.to_csv(os.path.join(tmp, "unreadable_images.csv"), index=False)
        c.log_artifacts(run_id, tmp, "inputs")


def _decode(cfg: TrainConfig, ann: annotations.Annotations, taxonomy: Taxonomy, image_size: int):
    """Decode train and val as trained on (unseen labels dropped) and test with every label's truth."""
    t0 = time.perf_counter()
    decode = {"image_size": image_size, "resize_mode": cfg.resize_mode, "max_pixels": cfg.max_pixels}
    decoded = train_data.decode_splits(ann, splits=("train", "val"), **decode)
    test_ann = ann
    if ann.unseen_dropped:  # zero-shot metrics on the test split need the unseen labels' truth
        test_ann = annotations.load(
            cfg.annotations,
            taxonomy,
            drop_unseen=False,
            require=(),
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
        )
    decoded.merge(train_data.decode_splits(test_ann, splits=("test",), **decode))
    counts = ", ".join(f"{s}={n}" for s, n in decoded.counts.items())
    _say(
        f"decoded {sum(decoded.counts.values())} images in {time.perf_counter() - t0:.1f}s ({counts}); "
        f"{decoded.n_errors} unreadable, skipped"
    )
    return decoded


def _evaluate(decoded, ann, model_dir: str, taxonomy: Taxonomy, train_labels, train_mask, cfg: TrainConfig):
    """Score val and test with the best model once; a report per split (with the label-prior baseline)."""
    splits = [s for s in ("val", "test") if decoded.counts.get(s, 0)]
    ds = decoded.eval(splits[0])
    for s in splits[1:]:
        ds = ds.union(decoded.eval(s))
    scored = evaluation.score_dataset(ds, model_dir, use_gpu=cfg.use_gpu, batch_size=cfg.eval_batch_size)
    split_of = dict(zip(ann.frame["image_id"], ann.frame["split"], strict=True))
    reports, by_split = {}, {}
    for s in splits:
        rows = np.array([split_of[i] == s for i in scored.image_ids], dtype=bool)
        by_split[s] = evaluation.Scored(
            scored.image_ids[rows], scored.scores[rows], scored.labels[rows], scored.mask[rows]
        )
        reports[s] = evaluation.report(
            by_split[s], taxonomy, s, train_labels=train_labels, train_mask=train_mask
        )
        _say(reports[s].headline())
    return reports, by_split


def _one_line(e: BaseException) -> str:
    """Ray's errors start with a generic line; the root cause ('XError: ...') is the last such line."""
    lines = [ln.strip() for ln in storage.redact(str(e)).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    if causes:
        return f"{lines[0].rstrip(':')}: {causes[-1]}" if lines[0] != causes[-1] else causes[-1]
    return lines[0] if lines else type(e).__name__


def _image_size(backbone: str) -> int:
    size = resolve_arch(backbone)["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])
