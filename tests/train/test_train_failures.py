"""A training run that cannot recover: a Ray Train worker killed (a real `os._exit` of rank 1's process,
like a lost node) with no failures allowed (`max_failures=0`). The run must end with one `TrainError`
line, its MLflow run marked FAILED, and the model registry exactly as it was: no new version, every alias
where it pointed. (The recoverable case, a kill within `max_failures`, is tests/train/test_train_ray.py.)"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from mumic_core import synthetic

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-unbroken"
N_TRAIN, N_VAL, N_TEST = 64, 16, 16


@pytest.fixture
def dataset(tmp_path):
    """Generated images + annotations.parquet (relative uris, explicit splits) + taxonomy.json, on disk."""
    data = tmp_path / "data"
    rows = synthetic.write_dataset(data, N_TRAIN + N_VAL + N_TEST, seed=71, size=64)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
    pd.DataFrame(rows).to_parquet(data / "annotations.parquet")
    (tmp_path / "taxonomy.json").write_text(json.dumps(synthetic.taxonomy().to_dict()))
    return str(data / "annotations.parquet"), str(tmp_path / "taxonomy.json")


def _registry_state(client, name: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(version, run id) of every version of `name`, and its aliases."""
    versions = sorted((str(v.version), v.run_id) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    return versions, aliases


def test_a_worker_killed_beyond_max_failures_fails_in_one_line_and_leaves_the_registry_unchanged(
    dataset, tiny_model_dir, ray_cluster, tmp_path, monkeypatch
):
    from pipelines.registry import log_model_version, tracking
    from pipelines.train import TrainConfig, TrainError, train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client(uri)
    # the registry before: version 1 holds both aliases (the champion in production, the last candidate)
    exp = tracking.ensure_experiment(client, "earlier", tracking.default_artifact_location(uri))
    earlier_run, _ = tracking.start_run(client, exp, "earlier")
    v1 = log_model_version(str(tiny_model_dir), MODEL_NAME, earlier_run, tracking_uri=uri, alias="champion")
    client.set_registered_model_alias(MODEL_NAME, "candidate", v1)
    before = _registry_state(client, MODEL_NAME)
    assert before == ([(v1, earlier_run)], {"champion": v1, "candidate": v1})

    annotations, taxonomy = dataset
    marker = tmp_path / "fault.marker"
    cfg = TrainConfig(
        annotations=annotations,
        taxonomy=taxonomy,
        backbone="mumic-tiny",
        train_mode="image",
        workers=2,
        max_failures=0,
        epochs=2,
        batch_size=8,
        workdir=str(tmp_path),
        tracking_uri=uri,
        storage_path=str(tmp_path / "ray_results"),
        experiment="fault-tests",
        run_name="killed-rank",
        register=MODEL_NAME,
        fault={"rank": 1, "epoch": 1, "marker": str(marker)},
    )
    t0 = time.monotonic()
    with pytest.raises(TrainError) as failed:
        train(cfg)
    seconds = time.monotonic() - t0
    message = str(failed.value)
    print(f"\nTrainError after {seconds:.1f}s: {message}")

    assert marker.read_text().startswith("rank 1 exited in epoch 1")  # the kill really happened
    assert "\n" not in message and message.startswith("training run 'killed-rank' failed: ")
    assert len(message) < 1000 and "Traceback" not in message
    assert "testing-secret-never-logged" not in message

    exp_id = client.get_experiment_by_name("fault-tests").experiment_id
    (run,) = client.search_runs([exp_id], filter_string="tags.`mlflow.runName` = 'killed-rank'")
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert _registry_state(client, MODEL_NAME) == before  # no new version; champion and candidate stay
    assert client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run.info.run_id}'") == []
    assert [m.name for m in client.search_registered_models()] == [MODEL_NAME]

    # the failed run's workers and their placement group are gone: the cluster's CPUs are free again
    deadline = time.monotonic() + 30
    while (left := _live_placement_groups(ray_cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def _live_placement_groups(ray) -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
