"""Retraining with Ray Train: `config` (TrainConfig, TrainResult), `driver` (train: annotations → fit →
evaluate → register), `worker` (the per-rank DDP loop) and `state` (checkpoints as safetensors + JSON)."""

# Exported lazily (PEP 562): `mumic <command> --help` reads the options module without importing Ray
# and torch through the rest of the room.
_EXPORTS = {
    "SELECT_METRICS": "config",
    "TrainConfig": "config",
    "TrainError": "config",
    "TrainResult": "config",
    "build_trainer": "driver",
    "train": "driver",
    "MODEL_DIR": "state",
    "STATE": "state",
    "load_state": "state",
    "save_state": "state",
    "train_loop_per_worker": "worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module  # the room's module named in _EXPORTS, on first use

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
