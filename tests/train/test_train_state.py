"""What a resumed run relies on, without Ray: checkpoint state round trips (safetensors + JSON, no pickle),
and the same run name continues the same MLflow run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mumic_core import synthetic
from mumic_core.model import MuMIC
from mumic_core.training import OptimConfig, make_optimizer, train_step
from pipelines.registry import tracking
from pipelines.train import STATE, TrainConfig, TrainError, load_state, save_state
from pipelines.train.driver import _one_line, cpus_per_worker


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny")
    return model, make_optimizer(model, OptimConfig())


def test_checkpoint_state_round_trips_and_the_next_step_is_identical(tmp_path):
    cfg = OptimConfig()
    pixels = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 2, (4, len(synthetic.LABELS)))
    model, optimizer = _model_and_optimizer(0)
    train_step(model, optimizer, pixels, labels, None, cfg)
    model.set_thresholds(np.linspace(0.1, 0.9, len(synthetic.LABELS)))
    save_state(str(tmp_path), model, optimizer, {"epoch": 3, "step": 42, "history": [{"epoch": 1}]})
    assert sorted(os.listdir(tmp_path)) == ["model", "optimizer.json", "optimizer.safetensors", STATE]
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in os.listdir(tmp_path / "model"))

    restored, restored_opt = _model_and_optimizer(1)  # different init: everything must come from disk
    state = load_state(str(tmp_path), restored, restored_opt)
    assert state == {"epoch": 3, "step": 42, "history": [{"epoch": 1}]}
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loss_a = train_step(model, optimizer, pixels, labels, None, cfg)
    loss_b = train_step(restored, restored_opt, pixels, labels, None, cfg)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert json.loads((tmp_path / "optimizer.json").read_text())["param_groups"][0]["name"]


def test_same_run_name_continues_the_same_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "resume", tracking.default_artifact_location(uri))
    assert tracking.default_artifact_location(uri) == str(tmp_path / "mlartifacts")
    first, resumed = tracking.start_run(c, exp, "weekly-42")
    assert not resumed
    tracking.log_params(c, first, {"epochs": 4, "nested": {"lr": 0.1}, "secret_uri": "s3://u:hunter2@host/x"})
    c.set_terminated(first, "FAILED")
    again, resumed = tracking.start_run(c, exp, "weekly-42")
    assert (again, resumed) == (first, True) and c.get_run(first).info.status == "RUNNING"
    tracking.log_params(c, again, {"epochs": 6})  # a changed value keeps the first one, with a warning
    params = c.get_run(first).data.params
    assert params["epochs"] == "4" and params["nested.lr"] == "0.1"
    assert "hunter2" not in params["secret_uri"]


def test_train_config_rejects_unknown_options_and_bad_values():
    with pytest.raises(ValueError, match="unknown training options: colour"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="select_metric"):
        TrainConfig(select_metric="accuracy")
    assert TrainConfig(batch_size=8).optim().batch_size == 8


def test_ray_failures_become_one_line_with_the_root_cause():
    error = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\nValueError: bad label matrix\n'
    )
    assert _one_line(error) == "Training failed due to worker errors: ValueError: bad label matrix"


@pytest.mark.parametrize(
    ("cpus", "nodes", "workers", "extra", "want"),
    [
        (8, 1, 1, {}, 7.0),  # one worker on a laptop-sized node trains on 7 threads (it used to get 1)
        (8, 1, 2, {}, 3.0),
        (16, 1, 3, {}, 5.0),
        (3, 1, 2, {}, 1.0),
        (2, 1, 1, {}, 1.0),  # 2 cores: one for the worker, one for Ray Data (2 threads thrash here)
        (2, 1, 2, {}, 0.5),  # fewer than 1 each, so that one CPU stays free for data
        (32, 2, 2, {}, 1.0),  # several nodes may differ: 1 each unless told
        (8, 1, 1, {"use_gpu": True}, 1.0),
        (8, 1, 1, {"cpus_per_worker": 2.5}, 2.5),
    ],
)
def test_cpus_per_worker_leaves_one_for_data_and_shares_the_rest_of_one_node(cpus, nodes, workers, extra, want):
    assert cpus_per_worker(TrainConfig(workers=workers, **extra), cpus, nodes) == want


def test_too_many_workers_for_the_cpus_is_a_train_error():
    with pytest.raises(TrainError, match="30 workers do not fit on 2 CPUs"):
        cpus_per_worker(TrainConfig(workers=30), 2, 1)
