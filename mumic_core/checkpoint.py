"""Saved models: a folder (local or any fsspec URI such as s3://) with `model.safetensors` + `config.json`.

The JSON holds everything needed to rebuild the model without the code that trained it: the resolved
open_clip architecture, the taxonomy, tau, bias, thresholds and preprocessing. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .model import ModelConfig, ModelError, MuMIC
from .taxonomy import Taxonomy

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def _mumic_version() -> str:
    try:
        return version("mumic")
    except PackageNotFoundError:
        return "unknown"


def _join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}"


def config_dict(model: MuMIC, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "mumic_version": _mumic_version(),
        "model": model.config.to_dict(),
        "taxonomy": model.taxonomy.to_dict(),
        "taxonomy_sha256": model.taxonomy.sha256,
        "tau": model.tau,
        "bias": float(model.bias.detach()),
        "thresholds": [float(t) for t in model.thresholds.tolist()],
        "preprocessing": {
            "image_size": model.config.image_size,
            "mean": list(model.config.mean),
            "std": list(model.config.std),
            "resize_mode": model.config.resize_mode,
            "input": "uint8 RGB [3,H,W], normalised on the model's device",
        },
        **(extra or {}),
    }


def state_bytes(model: MuMIC) -> bytes:
    # safetensors refuses shared storage; clone makes each tensor its own
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": "pt", "mumic_format_version": str(FORMAT_VERSION)})


def save(model: MuMIC, path_or_uri: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write the model folder; returns its URI. `extra` adds keys to config.json (e.g. metrics, run id)."""
    uri = str(path_or_uri)
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    weights = state_bytes(model)
    with fsspec.open(_join(uri, WEIGHTS), "wb") as f:
        f.write(weights)
    # config last: a folder with config.json is a complete model
    cfg = config_dict(model, {"weights_sha256": hashlib.sha256(weights).hexdigest(), **(extra or {})})
    with fsspec.open(_join(uri, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
    return uri


def read_config(path_or_uri: str | Path) -> dict[str, Any]:
    uri = str(path_or_uri)
    try:
        with fsspec.open(_join(uri, CONFIG), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"no saved model at {uri} (missing {CONFIG})") from None


def from_bytes(cfg: dict[str, Any], weights: bytes, map_location: str | torch.device = "cpu") -> MuMIC:
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ModelError(f"model format {cfg['format_version']} is newer than this mumic understands")
    config = ModelConfig.from_dict(cfg["model"])
    model = MuMIC(config, Taxonomy.from_dict(cfg["taxonomy"]))
    state = st_load(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"saved weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.set_train_mode(config.train_mode)
    return model.to(map_location).eval()


def load(path_or_uri: str | Path, map_location: str | torch.device = "cpu") -> MuMIC:
    """Rebuild a saved model (eval mode) from a local folder or a URI such as s3://bucket/models/v3."""
    uri = str(path_or_uri)
    cfg = read_config(uri)
    try:
        with fsspec.open(_join(uri, WEIGHTS), "rb") as f:
            weights = f.read()
    except FileNotFoundError:
        raise ModelError(f"saved model at {uri} has no {WEIGHTS}") from None
    return from_bytes(cfg, weights, map_location)
