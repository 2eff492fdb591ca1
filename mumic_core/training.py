"""Optimisation pieces shared by every trainer: param groups, LR schedule, one step, and a plain loop.

The plain single-process loop (`fit`) is what tests, benchmarks and baselines use; the Ray Train loop in
`pipelines` calls the same `make_optimizer` / `train_step`, so both optimise exactly the same thing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .losses import class_frequency_weights, tempered_sigmoid_bce
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
    """AdamW with separate LRs for the image tower, the text tower and tau/bias; no decay on 1-d params."""
    groups = []
    for name, params, lr in (
        ("image", model.image_parameters(), cfg.lr_image),
        ("text", model.text_parameters(), cfg.lr_text),
    ):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"name": f"{name}_nd", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    head = [p for p in model.head_parameters() if p.requires_grad]
    if head:
        groups.append({"name": "head", "params": head, "lr": cfg.lr_head, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def compute_loss(
    model: MuMIC,
    out: dict,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: OptimConfig,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    return tempered_sigmoid_bce(
        out["sim"],
        labels.to(out["sim"].dtype),
        model.log_tau,
        bias=model.bias if model.config.use_bias else None,
        mask=mask,
        weighting=cfg.loss_weighting,
        gamma=cfg.focal_gamma,
        class_weights=class_weights,
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: OptimConfig,
    class_weights: torch.Tensor | None = None,
    autocast_device: str | None = None,
) -> float:
    """One optimisation step. `model` may be DDP-wrapped; the loss needs the underlying MuMIC."""
    core: MuMIC = getattr(model, "module", model)
    optimizer.zero_grad(set_to_none=True)
    if autocast_device is not None:
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            out = model(pixels)
    else:
        out = model(pixels)
    loss = compute_loss(core, {k: v.float() for k, v in out.items()}, labels, mask, cfg, class_weights)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():  # keep tau in a sane range: too small saturates, too large never separates
        core.log_tau.clamp_(math.log(1e-3), math.log(1.0))
    return float(loss.detach())


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
) -> dict:
    """Plain single-process training loop over in-memory uint8 pixels [N,3,H,W] and labels [N,C]."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(pixels) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    class_weights = None
    if cfg.loss_weighting == "class_frequency":
        class_weights = class_frequency_weights(torch.as_tensor(labels), None if mask is None else torch.as_tensor(mask))
    step, samples, t0 = 0, 0, time.perf_counter()
    losses: list[float] = []
    epoch = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(pixels))
        epoch_loss, epoch_samples = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            set_lr(optimizer, lr_factor(step, total, cfg.warmup_steps))
            m = None if mask is None else torch.as_tensor(mask[idx])
            loss = train_step(model, optimizer, torch.as_tensor(pixels[idx]), torch.as_tensor(labels[idx]), m, cfg, class_weights)
            epoch_loss += loss * len(idx)
            epoch_samples += len(idx)
            samples += len(idx)
            step += 1
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
        losses.append(epoch_loss / max(1, epoch_samples))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
    model.eval()
    elapsed = time.perf_counter() - t0
    return {"epochs": epoch + 1, "steps": step, "samples": samples, "seconds": elapsed,
            "samples_per_s": samples / max(elapsed, 1e-9), "losses": losses}
