"""Training checkpoints as safetensors + JSON (nothing pickled): the model folder, optimizer state, epoch."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from mumic_core import checkpoint
from mumic_core.model import MuMIC

MODEL_DIR, OPTIM_WEIGHTS, OPTIM_META, STATE = (
    "model",
    "optimizer.safetensors",
    "optimizer.json",
    "train_state.json",
)


def save_state(folder: str, model: MuMIC, optimizer: torch.optim.Optimizer, state: dict) -> None:


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


    weights = checkpoint.weights_only(load_file(os.path.join(folder, MODEL_DIR, checkpoint.WEIGHTS)))
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
