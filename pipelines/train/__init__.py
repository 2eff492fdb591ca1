"""Retraining with Ray Train: `config` (TrainConfig, TrainResult), `driver` (train: annotations → fit →
evaluate → register), `worker` (the per-rank DDP loop) and `state` (checkpoints as safetensors + JSON)."""

from ..lazy import exports

# exported lazily: `mumic <command> --help` reads the options module without importing Ray and torch
_EXPORTS = {
    "config": ("SELECT_METRICS", "TrainConfig", "TrainError", "TrainResult"),
    "driver": ("build_trainer", "train"),
    "state": ("MODEL_DIR", "STATE", "load_state", "save_state"),
    "worker": ("train_loop_per_worker",),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__ = exports(__name__, _EXPORTS)
