"""Optimisation pieces shared by every trainer: param groups, LR schedule, one step, and a plain loop.

The plain single-process loop (`fit`) is what tests, benchmarks and baselines use; the Ray Train loop in
`pipelines` calls the same `make_optimizer` / `take_step` / `LossTally`, so both optimise exactly the same
thing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .heads import Objective
from .losses import class_frequency_weights
from .model import MuMIC


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 64
    lr_image: float = 3e-4
    lr_text: float = 1e-4  # lower than the image tower's by default (methods.md §1)
    lr_head: float = 1e-2  # tau and bias
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    loss_weighting: str = "none"  # none | focal | asymmetric | class_frequency
    focal_gamma: float = 2.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(model: MuMIC, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the head's learning-rate groups for the model's current stage (MuMIC: image tower, text
    tower, tau/bias); only parameters that train; no weight decay on 1-d parameters."""
    groups = []
    for group in model.head.lr_groups(model, cfg, model.stage):
        params = [p for p in group.params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2 and group.decay]
        no_decay = [p for p in params if p.ndim < 2 or not group.decay]
        if decay:
            groups.append({"name": group.name, "params": decay, "lr": group.lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            name = group.name if not group.decay else f"{group.name}_nd"
            groups.append({"name": name, "params": no_decay, "lr": group.lr, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    return torch.optim.AdamW(groups, **adamw_options(device))


def adamw_options(device: torch.device) -> dict:
    """How AdamW runs over the parameters on `device`: one fused kernel per step on a GPU (not one per
    parameter and operation), the multi-tensor (foreach) path elsewhere. The maths is the same."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def allows_tf32(device: torch.device) -> bool:
    """Whether fp32 matmuls and convolutions may run in TF32 on `device` (an Ampere or later GPU's tensor
    cores, ~8x fp32): on cuda, for training and validation alike. The image tower runs under bf16 autocast
    there anyway; TF32 reaches the text tower and the head, whose logits it moves by ~1e-3 at tau = 0.01
    (fp32 accumulation, inputs rounded to 10 bits), far inside what a threshold can tell apart."""
    return device.type == "cuda"


def use_fast_float32(device: torch.device) -> None:
    """The one place a training process sets TF32 (`allows_tf32`); a process-wide setting of torch."""
    if allows_tf32(device):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (torch.backends.cuda.matmul)
        torch.backends.cudnn.allow_tf32 = True  # convolutions (the patch stem): torch's default, made sure


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def make_objective(
    model: MuMIC, cfg: OptimConfig, class_weights: torch.Tensor | None = None, stage: int | None = None
) -> Objective:
    """The head's loss for `stage` (default: the model's current one). Build it once per stage, before
    any weights change: MKT's stage-1 objective keeps a frozen copy of the image tower as it is now."""
    return model.head.objective(model, model.stage if stage is None else stage, cfg, class_weights)


def stage_schedule(stages: Sequence[int], only: int | None, epochs: int, later_epochs: int | None = None) -> list[int]:
    """The stage of every epoch of a run: `epochs` of the first (or only) stage, then `later_epochs`
    (default: `epochs`) of each later one; `only` trains that one stage for `epochs`."""
    if only is not None:
        if only not in stages:
            raise ValueError(f"stage {only} is not one of this head's stages {list(stages)}")
        return [only] * epochs
    later = epochs if later_epochs is None else later_epochs
    return [s for i, s in enumerate(stages) for _ in range(epochs if i == 0 else later)]


def take_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: OptimConfig,
    class_weights: torch.Tensor | None = None,
    autocast_device: str | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """One optimisation step; the loss as a detached 0-d tensor on the model's device. Reading it
    (`float`) waits for the device to finish the step: loops add it up with `LossTally` and read once per
    epoch. `model` may be DDP-wrapped; the loss needs the underlying model.

    `objective` (make_objective) is the head's loss; None builds one for this step, which only heads whose
    loss holds no state allow."""
    core: MuMIC = getattr(model, "module", model)
    if objective is None:
        if core.head.stateful_objective:
            raise ValueError(f"head {core.config.head}: pass the objective made once by make_objective")
        objective = make_objective(core, cfg, class_weights)
    optimizer.zero_grad(set_to_none=True)
    if autocast_device is not None:
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            out = model(pixels)
    else:
        out = model(pixels)
    loss = objective({k: v.float() for k, v in out.items()}, labels, mask, pixels)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    core.head.after_step()
    return loss.detach()


def train_step(*args: Any, **kwargs: Any) -> float:
    """`take_step` (the same arguments) with the loss read at once, a device sync: for tests and one-off
    steps, not for a loop."""
    return float(take_step(*args, **kwargs))


class LossTally:
    """An epoch's sample-weighted loss and objective terms, summed on the device (float64) without a sync
    per step; `mean()` / `part_means()` read them once. The same numbers as `float(loss)` every step."""

    def __init__(self) -> None:
        self.samples = 0
        self._loss: torch.Tensor | float = 0.0
        self._parts: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, n: int, terms: dict[str, torch.Tensor] | None = None) -> None:
        self.samples += n
        self._loss = self._loss + loss.double() * n
        for k, v in (terms or {}).items():
            self._parts[k] = self._parts.get(k, 0.0) + v.detach().double() * n

    def mean(self) -> float:
        return float(self._loss) / max(self.samples, 1)

    def part_means(self) -> dict[str, float]:
        return {k: float(v) / max(self.samples, 1) for k, v in self._parts.items()}


@torch.no_grad()
def predict(model: MuMIC, pixels: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N, C] and embeddings [N, D] for uint8 pixels [N, 3, H, W]."""
    model.eval()
    scores, embs = [], []
    for i in range(0, len(pixels), batch_size):
        out = model(pixels[i : i + batch_size])
        scores.append(out["probs"].float().cpu().numpy())
        embs.append(out["img_emb"].float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(embs)


def fit(
    model: MuMIC,
    pixels: np.ndarray,
    labels: np.ndarray,
    cfg: OptimConfig,
    mask: np.ndarray | None = None,
    time_budget_s: float | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    stages: Sequence[int] | None = None,
) -> dict:
    """Plain single-process training loop over in-memory uint8 pixels [N,3,H,W] and labels [N,C]:
    `cfg.epochs` epochs of each stage in `stages` (default: every stage of the head, in order)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    class_weights = None
    if cfg.loss_weighting == "class_frequency":
        class_weights = class_frequency_weights(torch.as_tensor(labels), None if mask is None else torch.as_tensor(mask))
    stages = list(model.head.stages if stages is None else stages)
    objectives = {s: make_objective(model, cfg, class_weights, s) for s in stages}  # before any step changes weights
    t0 = time.perf_counter()
    out_of_time = (lambda: time.perf_counter() - t0 > time_budget_s) if time_budget_s is not None else (lambda: False)
    losses: list[float] = []
    steps = samples = 0
    for stage in stages:
        model.begin_stage(stage)
        model.train()
        optimizer = make_optimizer(model, cfg)
        total = math.ceil(len(pixels) / cfg.batch_size) * cfg.epochs
        stage_step = 0
        for _ in range(cfg.epochs):
            tally = LossTally()
            order = rng.permutation(len(pixels))
            for idx in (order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)):
                set_lr(optimizer, lr_factor(stage_step, total, cfg.warmup_steps))
                m = None if mask is None else torch.as_tensor(mask[idx])
                x, y = torch.as_tensor(pixels[idx]), torch.as_tensor(labels[idx])
                loss = take_step(model, optimizer, x, y, m, cfg, class_weights, objective=objectives[stage])
                tally.add(loss, len(idx))
                steps, stage_step, samples = steps + 1, stage_step + 1, samples + len(idx)
                if out_of_time():
                    break
            losses.append(tally.mean())
            if on_epoch is not None:
                on_epoch(len(losses) - 1, losses[-1])
            if out_of_time():
                break
        if out_of_time():
            break
    model.eval()
    elapsed = time.perf_counter() - t0
    return {"epochs": len(losses), "steps": steps, "samples": samples, "seconds": elapsed,
            "samples_per_s": samples / max(elapsed, 1e-9), "losses": losses}
