"""The function every Ray Train worker runs: DDP over gloo on CPU, NCCL on GPU.

    model → [resume from checkpoint] → per epoch: train steps on its shard → validate (sharded, gathered)
          → tune thresholds → checkpoint (rank 0) → ray.train.report

The optimisation itself is `mumic_core.training` (make_optimizer, lr_factor, train_step), the same code
the plain single-process loop runs.
"""

from __future__ import annotations

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

from mumic_core import metrics
from mumic_core.model import MuMIC
from mumic_core.scoring import Scorer
from mumic_core.taxonomy import Taxonomy
from mumic_core.training import lr_factor, make_optimizer, set_lr, train_step

from ..progress import Progress
from .config import TrainConfig
from .state import load_state, save_state


def _owner(image_id: str, world: int) -> int:
    """Which rank scores a validation row: by id, so it does not depend on the order rows arrive in."""
    return zlib.crc32(str(image_id).encode()) % world


def _validate(model: MuMIC, shard, rank: int, world: int, batch_size: int, group) -> tuple[np.ndarray, ...]:
    """Each rank scores its share of the (unsplit) validation stream through the one scoring path;
    rank 0 gets all, sorted by id."""
    scorer = Scorer(model, device=model.pixel_mean.device)  # eval mode, the same precision as retag
    ids, scores, labels, masks = [], [], [], []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
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
    for epoch in range(worker.state["epoch"], worker.cfg.epochs):
        t0 = time.perf_counter()
        loss, n_samples = worker.train_epoch(epoch)
        worker.validate_and_report(epoch, loss, n_samples, t0)
    return {"history": worker.state["history"]} if worker.rank == 0 else None


@dataclass
class _Worker:
    """One rank's model, optimizer, data shards and progress (`state`: epoch, step, history)."""

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
    total_steps: int

    @classmethod
    def start(cls, config: dict) -> _Worker:
        cfg = TrainConfig.from_dict(config["train"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(int(config["threads"]))
        device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)
        model = MuMIC.create(Taxonomy.from_dict(config["taxonomy"]), **cfg.model_options()).to(device)
        optimizer = make_optimizer(model, cfg.optim())
        state: dict = {"epoch": 0, "step": 0, "history": []}
        resume = ray.train.get_checkpoint()
        if resume is not None:
            with resume.as_directory() as folder:
                state = load_state(folder, model, optimizer)
            if rank == 0:
                Progress("train")(f"resuming after epoch {state['epoch']} (step {state['step']})")
        weights = config.get("class_weights")
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
        return cls(
            cfg=cfg,
            rank=rank,
            world=world,
            device=device,
            model=model,
            ddp=ddp,
            optimizer=optimizer,
            state=state,
            class_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
            group=group,
            total_steps=int(config["steps_per_epoch"]) * cfg.epochs,
        )

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over this rank's shard; (mean loss, samples)."""
        cfg, optim_cfg = self.cfg, self.cfg.optim()
        on_gpu = self.device.type == "cuda"
        self.model.train()
        loss_sum, n_samples = 0.0, 0
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=4 * cfg.batch_size,
            **({"device": self.device} if on_gpu else {}),
        )
        for i, batch in enumerate(batches):
            _maybe_fault(cfg.fault, self.rank, epoch, i)
            set_lr(self.optimizer, lr_factor(self.state["step"], self.total_steps, cfg.warmup_steps))
            loss = train_step(
                self.ddp,
                self.optimizer,
                batch["image"],
                batch["labels"],
                batch["mask"],
                optim_cfg,
                self.class_weights,
                "cuda" if on_gpu else None,
            )
            loss_sum += loss * len(batch["image"])
            n_samples += len(batch["image"])
            self.state["step"] += 1
        return loss_sum / max(n_samples, 1), n_samples

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
            "tau": self.model.tau,
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
