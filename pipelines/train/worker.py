"""The function every Ray Train worker runs: DDP over gloo on CPU, NCCL on GPU.

    model → the head's loss per stage → [resume from checkpoint] → per epoch: [a new stage: its optimizer,
          a new DDP] → train steps on its shard → validate (sharded, gathered) → tune thresholds
          → checkpoint (rank 0) → ray.train.report

The optimisation itself is `mumic_core.training` (make_optimizer, make_objective, lr_factor, take_step),
the same code the plain single-process loop runs; what trains and how is the head's (mumic_core.heads).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mumic_core import checkpoint, metrics
from mumic_core.heads import Objective
from mumic_core.model import MuMIC
from mumic_core.scoring import Scorer
from mumic_core.taxonomy import Taxonomy
from mumic_core.training import (
    LossTally,
    lr_factor,
    make_objective,
    make_optimizer,
    set_lr,
    take_step,
    use_fast_float32,
)
from mumic_core.warmstart import warm_start

from ..progress import Progress
from .config import TrainConfig
from .state import STATE, load_state, save_state

GPU_PREFETCH_BATCHES = 4  # batches collated (and copied) ahead of the step on a GPU; Ray's default is 1


def loader_options(device: torch.device) -> dict[str, Any]:
    """How a rank iterates its training shard (`iter_torch_batches`). On a GPU: batches in pinned memory,
    copied to it by Ray without blocking (its finalize step copies non_blocking), a few collated ahead so
    the next batch is ready when the step ends. On a CPU: Ray's defaults; there is no copy to overlap."""
    if device.type != "cuda":
        return {}
    return {"device": device, "pin_memory": True, "prefetch_batches": GPU_PREFETCH_BATCHES}


def validation_prefetch(device: torch.device) -> int:
    """Batches of the validation stream read ahead (`iter_batches`): more on a GPU, which scores faster."""
    return GPU_PREFETCH_BATCHES if device.type == "cuda" else 1


def _owner(image_id: str, world: int) -> int:
    """Which rank scores a validation row: by id, so it does not depend on the order rows arrive in."""
    return zlib.crc32(str(image_id).encode()) % world


def _validate(model: MuMIC, shard, rank: int, world: int, batch_size: int, group) -> tuple[np.ndarray, ...]:
    """Each rank scores its share of the (unsplit) validation stream through the one scoring path;
    rank 0 gets all, sorted by id."""
    scorer = Scorer(model, device=model.pixel_mean.device)  # eval mode, the same precision as retag
    ids, scores, labels, masks = [], [], [], []
    prefetch = validation_prefetch(model.pixel_mean.device)
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch):
        mine = np.array([_owner(i, world) == rank for i in batch["image_id"]], dtype=bool)
        if not mine.any():
            continue
        ids.append(batch["image_id"][mine].astype(str))
        scores.append(scorer.predict(batch["image"][mine], batch_size=batch_size).scores)
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


def _epochs_done(folder: str) -> int:
    """How many epochs a training checkpoint holds (its train state), before restoring anything."""
    with open(os.path.join(folder, STATE)) as f:
        return int(json.load(f)["epoch"])


def _distributed(model: MuMIC, cfg: TrainConfig) -> torch.nn.Module:
    """The model under DDP (for more than one worker). DDP broadcasts rank 0's weights here; buffers
    (thresholds) never change in training: no per-step sync."""
    return ray.train.torch.prepare_model(
        model,
        move_to_device=False,
        parallel_strategy_kwargs={
            "find_unused_parameters": cfg.find_unused_parameters,
            "broadcast_buffers": False,
        },
    )


def _maybe_fault(fault: dict | None, rank: int, epoch: int, step_in_epoch: int) -> None:
    """Test hook: the chosen rank dies (no cleanup, like a lost node) once, mid-epoch."""
    if not fault or rank != int(fault.get("rank", 1)) or epoch + 1 != int(fault.get("epoch", 2)):
        return
    if step_in_epoch != int(fault.get("step", 1)) or os.path.exists(fault["marker"]):
        return
    with open(fault["marker"], "w") as f:
        f.write(f"rank {rank} exited in epoch {epoch + 1}\n")
    Progress("train")(f"fault injection: rank {rank} exits in epoch {epoch + 1}")
    os._exit(1)


def train_loop_per_worker(config: dict) -> dict | None:
    """The function every Ray Train worker runs (DDP over gloo on CPU, NCCL on GPU)."""
    worker = _Worker.start(config)
    for epoch in range(worker.state["epoch"], len(worker.stages)):
        t0 = time.perf_counter()
        worker.enter_stage(worker.stages[epoch])
        loss, n_samples = worker.train_epoch(epoch)
        worker.validate_and_report(epoch, loss, n_samples, t0)
    return {"history": worker.state["history"]} if worker.rank == 0 else None


@dataclass
class _Worker:
    """One rank's model, optimizer, data shards and progress (`state`: epoch, step, stage_step, history)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: MuMIC
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: dict
    class_weights: torch.Tensor | None
    group: Any  # the process group validation results are gathered over
    steps_per_epoch: int
    stages: list[int]  # the head's training stage of every epoch (TrainConfig.stages)
    objectives: dict[int, Objective]  # the head's loss per stage, built before any weight changed
    loss_parts: dict[str, float]  # this epoch's means of the objective's terms (per sample)

    @classmethod
    def start(cls, config: dict) -> _Worker:
        cfg = TrainConfig.from_dict(config["train"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(int(config["threads"]))
        device = ray.train.torch.get_device()
        use_fast_float32(device)  # TF32 on a GPU, for this process's training and validation alike
        torch.manual_seed(cfg.seed)
        taxonomy = Taxonomy.from_dict(config["taxonomy"])
        if config.get("init_uri"):  # --init: the saved model's backbone and weights, this run's labels
            model = warm_start(checkpoint.load(config["init_uri"]), taxonomy, cfg.model_options())[0].to(device)
        else:
            model = MuMIC.create(taxonomy, **cfg.model_options()).to(device)
        weights = config.get("class_weights")
        class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        stages = cfg.stages()
        # before a checkpoint is restored: MKT's stage-1 teacher is the image tower the run started from
        objectives = {s: make_objective(model, cfg.optim(), class_weights, s) for s in dict.fromkeys(stages)}
        state: dict = {"epoch": 0, "step": 0, "stage_step": 0, "history": []}
        resume = ray.train.get_checkpoint()
        if resume is None:
            model.begin_stage(stages[0])
            optimizer = make_optimizer(model, cfg.optim())
        else:
            with resume.as_directory() as folder:
                model.begin_stage(stages[max(_epochs_done(folder) - 1, 0)])  # whose optimizer it holds
                optimizer = make_optimizer(model, cfg.optim())
                state = load_state(folder, model, optimizer)
            state.setdefault("stage_step", state["step"])  # a checkpoint from before stages existed
            if rank == 0:
                Progress("train")(f"resuming after epoch {state['epoch']} (step {state['step']})")
        group = None
        if world > 1 and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo")  # gather validation results on CPU, whatever the backend
        return cls(
            cfg=cfg,
            rank=rank,
            world=world,
            device=device,
            model=model,
            ddp=_distributed(model, cfg),
            optimizer=optimizer,
            state=state,
            class_weights=class_weights,
            group=group,
            steps_per_epoch=int(config["steps_per_epoch"]),
            stages=stages,
            objectives=objectives,
            loss_parts={},
        )

    def enter_stage(self, stage: int) -> None:
        """From one stage to the next: other parameters train, so a new optimizer and a new DDP wrapper
        (DDP syncs the parameters that required grad when it was built)."""
        if stage == self.model.stage:
            return
        self.model.begin_stage(stage)
        self.optimizer = make_optimizer(self.model, self.cfg.optim())
        del self.ddp  # its reducer's hooks go with it
        self.ddp = _distributed(self.model, self.cfg)
        self.state["stage_step"] = 0
        if self.rank == 0:
            Progress("train")(f"stage {stage} of head {self.cfg.head}")

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this rank's shard; (mean loss, samples). The losses stay on the device until
        the epoch ends (LossTally): reading one every step would wait for the GPU every step."""
        cfg, optim_cfg = self.cfg, self.cfg.optim()
        on_gpu = self.device.type == "cuda"
        objective = self.objectives[self.model.stage]
        stage_steps = self.steps_per_epoch * self.stages.count(self.model.stage)
        self.model.train()
        tally = LossTally()
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=4 * cfg.batch_size,
            **loader_options(self.device),
        )
        for i, batch in enumerate(batches):
            _maybe_fault(cfg.fault, self.rank, epoch, i)
            set_lr(self.optimizer, lr_factor(self.state["stage_step"], stage_steps, cfg.warmup_steps))
            loss = take_step(
                self.ddp,
                self.optimizer,
                batch["image"],
                batch["labels"],
                batch["mask"],
                optim_cfg,
                self.class_weights,
                "cuda" if on_gpu else None,
                objective,
            )
            tally.add(loss, len(batch["image"]), objective.terms)
            self.state["step"] += 1
            self.state["stage_step"] += 1
        self.loss_parts = tally.part_means()
        return tally.mean(), tally.samples

    def validate_and_report(self, epoch: int, loss: float, n_samples: int, t0: float) -> None:
        """Validate, tune thresholds and checkpoint on rank 0; every rank reports (Ray's barrier)."""
        train_seconds = time.perf_counter() - t0
        val_shard = ray.train.get_dataset_shard("val")
        ids, scores, labels, mask = _validate(
            self.model, val_shard, self.rank, self.world, self.cfg.eval_batch_size, self.group
        )
        self.state["epoch"] = epoch + 1
        if self.rank != 0:
            ray.train.report({}, checkpoint=None)
            return
        full = metrics.evaluate_all(scores, labels, class_names=self.model.taxonomy.names, mask=mask)
        self.model.set_thresholds(metrics.tune_thresholds(scores, labels, mask=mask))
        report: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss,
            "train_samples": n_samples * self.world,
            "train_seconds": train_seconds,
            "samples_per_s": n_samples * self.world / max(train_seconds, 1e-9),
            "stage": self.model.stage,
            **{f"loss_{k}": v for k, v in self.loss_parts.items()},  # rank 0's shard
            **self.model.head.summary(),  # tau, bias where the head has them
            **{f"val_{k}": float(v) for k, v in full.items() if k != "per_class_ap"},
            "val_per_class_ap": full["per_class_ap"],
        }
        selected = report[f"val_{self.cfg.select_metric}"]
        report["score"] = selected if math.isfinite(selected) else -1.0  # Ray ranks checkpoints by it
        report["epoch_seconds"] = time.perf_counter() - t0
        self.state["history"].append({k: v for k, v in report.items() if k != "val_per_class_ap"})
        with tempfile.TemporaryDirectory(prefix="mumic-ckpt-") as folder:
            save_state(folder, self.model, self.optimizer, self.state)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
