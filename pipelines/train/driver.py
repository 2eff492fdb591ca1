"""Retraining, the driver side: annotations → validate → decode (Ray Data) → TorchTrainer.fit() → best
checkpoint → evaluate val/test → artifacts → register a version (alias `candidate`).

The workers' side is `worker.train_loop_per_worker`. Registration happens once, on the driver, after fit:
a worker restart cannot register twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from mumic_core import checkpoint
from mumic_core.losses import class_frequency_weights
from mumic_core.model import resolve_arch
from mumic_core.taxonomy import Taxonomy

from .. import annotations, storage
from ..annotations import Augment
from ..cluster import ensure_ray
from ..evaluation import Report, Scored, report, score_dataset, write_artifacts
from ..progress import Progress
from ..registry import ModelRef, log_model_version, resolve_model, tracking
from .config import TrainConfig, TrainError, TrainResult
from .state import MODEL_DIR, STATE
from .worker import train_loop_per_worker

log = logging.getLogger(__name__)


def _cpus_per_worker(cfg: TrainConfig) -> float:
    """The CPUs each worker reserves, and (whole ones) its torch threads: `cpus_per_worker(...)` over this
    cluster's CPUs and nodes."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU"))
    return cpus_per_worker(cfg, float(ray.cluster_resources().get("CPU", 1)), max(1, nodes))


def cpus_per_worker(cfg: TrainConfig, total: float, nodes: int = 1) -> float:
    """CPUs per CPU-training worker, one CPU left free for the Ray Data tasks that feed them.

    On one node the workers share what is left: 1 worker on 8 cores trains on 7 threads (it used to get 1
    whatever the node). On several nodes, or on a GPU, 1 CPU each (the nodes may differ: set
    `cpus_per_worker` to use more). Fewer than 1 each when `workers` CPUs would leave none for data."""
    if cfg.cpus_per_worker:
        return float(cfg.cpus_per_worker)
    if cfg.use_gpu:
        return 1.0
    if total - cfg.workers >= 1:
        return float((total - 1) // cfg.workers) if nodes == 1 else 1.0  # >= 1: total - 1 >= workers
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


say = Progress("train")


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
    init_uri: str | None = None,
):
    """The TorchTrainer of a run: `datasets` = {"train": per-epoch stream, "val": readable rows (not split)};
    `init_uri`: the model folder every rank warm-starts from (`--init`, resolved by the driver)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": _worker_config(cfg),
            "taxonomy": taxonomy.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "threads": max(1, int(cpus_per_worker)),
            "class_weights": class_weights,
            "init_uri": init_uri,
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


def _worker_config(cfg: TrainConfig) -> dict[str, Any]:
    """What each rank is told: the config without the tracking URI (it may carry credentials, and only the
    driver talks to MLflow)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "tracking_uri"}


@dataclass
class _Run:
    """What the driver holds through a training run."""

    cfg: TrainConfig
    name: str
    workdir: str
    storage_path: str
    tracking_uri: str
    taxonomy: Taxonomy
    ann: annotations.Annotations
    decoded: annotations.DecodedSplits
    image_size: int
    train_labels: np.ndarray  # [N_train, C] of the readable training rows
    train_mask: np.ndarray
    client: Any = None  # MlflowClient
    run_id: str = ""
    init: ModelRef | None = None  # --init, resolved once here (workers read the folder)


def train(cfg: TrainConfig) -> TrainResult:
    """Validate annotations, fine-tune with Ray Train, evaluate, log to MLflow, register (if asked)."""
    started = time.perf_counter()
    run = _prepare(cfg)
    _start_tracking(run)
    result = _fit(run)
    best, best_metrics = _best(result, "score")
    history = _state_of(result.checkpoint or best)["history"]
    model_dir = f"{_checkpoint_uri(best).rstrip('/')}/{MODEL_DIR}"
    selected = best_metrics[f"val_{cfg.select_metric}"]
    say(f"best epoch {best_metrics['epoch']} (val {cfg.select_metric} {selected:.4f}): {model_dir}")
    reports = _evaluate_best(run, model_dir, int(best_metrics["epoch"]), history)
    samples = sum(h.get("train_samples", 0) for h in history)
    seconds = sum(h.get("train_seconds", 0.0) for h in history)
    out = TrainResult(
        run_name=run.name,
        run_id=run.run_id,
        tracking_uri=run.tracking_uri,
        epochs=len(history),
        best_epoch=int(best_metrics["epoch"]),
        model_dir=model_dir,
        val=reports["val"],
        test=reports.get("test"),
        unreadable=run.decoded.n_errors,
        history=history,
        samples_per_s=samples / seconds if seconds else 0.0,
    )
    if cfg.register:
        _register(run, out, reports.get("test", reports["val"]))
    run.client.set_terminated(run.run_id, "FINISHED")
    out.seconds = time.perf_counter() - started
    return out


def _prepare(cfg: TrainConfig) -> _Run:
    """Read and validate the annotations, then decode every split once (Ray Data)."""
    workdir = os.path.abspath(cfg.workdir)
    taxonomy = Taxonomy.load(cfg.taxonomy)
    ann = annotations.load(
        cfg.annotations,
        taxonomy,
        drop_unseen=True,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    tracking_uri = cfg.tracking_uri or tracking.tracking_uri(workdir)
    init = _resolve_init(cfg.init, tracking_uri, workdir, taxonomy) if cfg.init else None
    if init:
        _check_init_head(cfg, init)
        saved = checkpoint.read_config(init.uri)["model"]  # the backbone trained on is --init's: log that one
        cfg = replace(cfg, backbone=saved["backbone"], pretrained=saved.get("pretrained"))
    image_size = int(checkpoint.read_config(init.uri)["preprocessing"]["image_size"]) if init else _image_size(cfg.backbone)
    if ann.unseen_dropped:
        unseen = [lb.name for lb in taxonomy.labels if lb.unseen]
        say(f"open-vocabulary protocol: {len(unseen)} unseen label(s) dropped from the training annotations "
            f"(scored zero-shot through the text tower): {', '.join(unseen)}")
    ensure_ray()
    decoded = _decode(cfg, ann, taxonomy, image_size)
    for split in ("train", "val"):
        if decoded.counts.get(split, 0) == 0:
            raise annotations.AnnotationError(f"{ann.source}: no readable images in split {split!r}")
    train_ann = ann.split("train").without(decoded.errors["image_id"])
    return _Run(
        cfg=cfg,
        name=cfg.run_name or time.strftime("mumic-%Y%m%d-%H%M%S", time.gmtime()),
        workdir=workdir,
        storage_path=cfg.storage_path or os.path.join(workdir, "ray_results"),
        tracking_uri=tracking_uri,
        taxonomy=taxonomy,
        ann=ann,
        decoded=decoded,
        image_size=image_size,
        train_labels=train_ann.label_matrix(),
        train_mask=train_ann.known_mask(),
        init=init,
    )


def _start_tracking(run: _Run) -> None:
    """The MLflow run of this run name (resumed when it exists), with the inputs logged."""
    cfg, uri = run.cfg, run.tracking_uri
    run.client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(
        run.client, cfg.experiment, cfg.artifact_location or tracking.default_artifact_location(uri, run.workdir)
    )
    run.run_id, resumed = tracking.start_run(run.client, experiment_id, run.name, tags={"mumic.kind": "train"})
    say(
        f"MLflow run {run.run_id} ({'resumed' if resumed else 'new'}) in experiment {cfg.experiment!r} "
        f"at {storage.redact(uri)}"
    )


def _fit(run: _Run):
    """Ray Train over the decoded splits; a failure past max_failures is one line and a FAILED run."""
    cfg = run.cfg
    cpus = _cpus_per_worker(cfg)
    steps_per_epoch = math.ceil((run.decoded.counts["train"] // cfg.workers) / cfg.batch_size)
    _log_inputs(
        run.client,
        run.run_id,
        cfg,
        run.taxonomy,
        run.decoded,
        run_name=run.name,
        storage_path=run.storage_path,
        image_size=run.image_size,
        cpus_per_worker=cpus,
        steps_per_epoch=steps_per_epoch,
        **({"init_uri": run.init.uri, "init_name": run.init.name, "init_version": run.init.version} if run.init else {}),
    )
    finished = _finished(run)
    if finished is not None:
        return finished
    class_weights = None
    if cfg.loss_weighting == "class_frequency":
        class_weights = class_frequency_weights(
            torch.as_tensor(run.train_labels), torch.as_tensor(run.train_mask)
        ).tolist()
    trainer = build_trainer(
        cfg,
        run.taxonomy,
        {
            "train": run.decoded.train(Augment.parse(cfg.augment, cfg.crop_scale_min)),
            "val": run.decoded.eval("val"),
        },
        steps_per_epoch,
        run_name=run.name,
        storage_path=run.storage_path,
        cpus_per_worker=cpus,
        callbacks=[tracking.EpochLogger(run.tracking_uri, run.run_id, len(cfg.stages()))],
        class_weights=class_weights,
        init_uri=run.init.uri if run.init else None,
    )
    try:
        return trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: one line, the run marked failed
        run.client.set_terminated(run.run_id, "FAILED")
        raise TrainError(f"training run {run.name!r} failed: {_one_line(e)}") from e


def _state_of(ckpt) -> dict:
    """A checkpoint's train state (epoch, step, history), read alone: not the model and optimizer files
    beside it, which `as_directory()` would download from S3 first."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{STATE}") as f:
        return json.loads(f.read())


def _finished(run: _Run):
    """The Ray Train result of this run name when its checkpoints already hold every epoch the config
    asks for (a rerun of a finished run): the driver evaluates and registers from it without starting a
    worker group, which would only find nothing left to train. None when there is no such run or
    epochs remain; then Ray Train resumes it (or starts it) as usual."""
    try:
        result = ray.train.Result.from_path(f"{run.storage_path.rstrip('/')}/{run.name}")
    except (RuntimeError, FileNotFoundError):  # no folder, or no checkpoint-manager snapshot in it yet
        return None
    if result.checkpoint is None:
        return None
    done = len(_state_of(result.checkpoint)["history"])
    if done < len(run.cfg.stages()):
        return None
    say(f"run {run.name!r} has all {done} epochs checkpointed: nothing to train, no worker group started")
    return result


def _evaluate_best(run: _Run, model_dir: str, best_epoch: int, history: list[dict]) -> dict:
    """Reports of the best checkpoint on val and test, logged as metrics and artifacts."""
    reports, scored_by_split = _evaluate(
        run.decoded, run.ann, model_dir, run.taxonomy, run.train_labels, run.train_mask, run.cfg
    )
    val = reports["val"]
    say(f"val mAP {val.metrics['map']:.4f} vs label-prior baseline {val.metrics['baseline_map']:.4f}")
    for s, r in reports.items():  # per-epoch metrics own the `val_` names: the final ones are `best_val_`
        prefix = "best_val_" if s == "val" else f"{s}_"
        tracking.log_metrics(
            run.client, run.run_id, {**r.metrics, "ap": r.per_class_ap}, step=best_epoch, prefix=prefix
        )
    thresholds = np.asarray(checkpoint.read_config(model_dir)["thresholds"], dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="mumic-report-") as tmp:
        write_artifacts(tmp, list(reports.values()), scored_by_split["val"], run.taxonomy, thresholds)
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f, indent=2)
        run.client.log_artifacts(run.run_id, tmp, "evaluation")
    return reports


def _register(run: _Run, out: TrainResult, held_out: Report) -> None:
    """The best model as a new registry version (held-out metrics as its tags), with the run's alias."""
    cfg = run.cfg
    out.model_version = log_model_version(
        out.model_dir,
        cfg.register,
        run.run_id,
        tracking_uri=run.tracking_uri,
        alias=cfg.alias,
        metrics={k: v for k, v in held_out.metrics.items() if not k.startswith("baseline_")},
        eval_split=held_out.split,
        tags={"run_name": run.name, "best_epoch": str(out.best_epoch)},
    )
    out.model_name, out.alias = cfg.register, cfg.alias
    say(f"registered {cfg.register} version {out.model_version} with alias {cfg.alias!r}")


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
    decoded = annotations.decode_splits(ann, splits=("train", "val"), **decode)
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
    decoded.merge(annotations.decode_splits(test_ann, splits=("test",), **decode))
    counts = ", ".join(f"{s}={n}" for s, n in decoded.counts.items())
    say(
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
    scored = score_dataset(ds, model_dir, use_gpu=cfg.use_gpu, batch_size=cfg.eval_batch_size)
    split_of = dict(zip(ann.frame["image_id"], ann.frame["split"], strict=True))
    reports, by_split = {}, {}
    for s in splits:
        rows = np.array([split_of[i] == s for i in scored.image_ids], dtype=bool)
        by_split[s] = Scored(
            scored.image_ids[rows], scored.scores[rows], scored.labels[rows], scored.mask[rows]
        )
        reports[s] = report(
            by_split[s], taxonomy, s, train_labels=train_labels, train_mask=train_mask
        )
        say(reports[s].headline())
    return reports, by_split


def _one_line(e: BaseException) -> str:
    """Ray's errors start with a generic line; the root cause ('XError: ...') is the last such line."""
    lines = [ln.strip() for ln in storage.redact(str(e)).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    if causes:
        return f"{lines[0].rstrip(':')}: {causes[-1]}" if lines[0] != causes[-1] else causes[-1]
    return lines[0] if lines else type(e).__name__


def _resolve_init(ref: str, uri: str, workdir: str, taxonomy: Taxonomy) -> ModelRef:
    """`--init` as a model folder the workers read (a `runs:/` artifact is downloaded under the workdir)."""
    if ref.startswith("runs:/"):
        import mlflow  # only this path needs MLflow's artifact download

        target = os.path.join(workdir, "init_models", re.sub(r"[^\w.-]+", "_", ref.removeprefix("runs:/")))
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=target, tracking_uri=uri)
        mref = ModelRef(ref, local, f"run:{ref.split('/')[1]}", resolve_model(local).version)
    else:
        mref = resolve_model(ref, tracking_uri=uri)
    old = checkpoint.read_config(mref.uri)["taxonomy"]
    old_names = set(Taxonomy.from_dict(old).names)
    added = sum(n not in old_names for n in taxonomy.names)
    say(f"warm start from {storage.redact(ref)} ({mref.name} version {mref.version}): {added} new label(s), "
        f"{len(old_names - set(taxonomy.names))} dropped")
    return mref


def _check_init_head(cfg: TrainConfig, init: ModelRef) -> None:
    """The run's head is --init's (its weights fit no other head): a mismatch is one line, not a run that
    logs one head and trains another."""
    saved = checkpoint.read_config(init.uri)["model"].get("head", "mumic")
    if saved != cfg.head:
        raise TrainError(f"--init {init.name} version {init.version} has head {saved!r}: train it with --head {saved}")


def _image_size(backbone: str) -> int:
    size = resolve_arch(backbone)["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])
