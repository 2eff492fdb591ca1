"""Retraining with Ray Train: `config` (TrainConfig, TrainResult), `driver` (train: annotations → fit →
evaluate → register), `worker` (the per-rank DDP loop) and `state` (checkpoints as safetensors + JSON)."""

from .config import SELECT_METRICS, TrainConfig, TrainError, TrainResult
from .driver import build_trainer, train
from .state import MODEL_DIR, STATE, load_state, save_state
from .worker import train_loop_per_worker

__all__ = [
    "MODEL_DIR",
    "SELECT_METRICS",
    "STATE",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "build_trainer",
    "load_state",
    "save_state",
    "train",
    "train_loop_per_worker",
]
