"""End to end on a real Ray cluster, the local S3 server and a real MLflow sqlite store: 2 CPU workers
fine-tune the tiny model on generated annotations in S3 (checkpoints and MLflow artifacts in S3 too),
rank 1 is killed once mid-training, the run resumes from its last checkpoint, and exactly one model
version is registered.

One training run (module fixture) serves every test here; each test checks one promise of the issue.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pandas as pd
import pytest

from mumic_core import checkpoint, metrics, synthetic
from mumic_core.images import load_for_model
from pipelines import annotations, storage

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-tagger"
EPOCHS = 4
N_TRAIN, N_VAL, N_TEST = 480, 100, 60
UNSEEN = ("yellow",)


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    """Generated images + annotations.parquet (relative uris) + taxonomy.json in a fresh bucket, with two
    rows that cannot be read: a missing object and a file that is not an image."""
    import boto3
    import s3fs

    bucket = f"train-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    local = tmp_path_factory.mktemp("dataset")
    rows = synthetic.write_dataset(local / "data", N_TRAIN + N_VAL + N_TEST, seed=3, size=64)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
    (local / "data" / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    rows.append({"image_id": "broken", "uri": "images/broken.jpg", "labels": ["red"], "split": "train"})
    rows.append({"image_id": "missing", "uri": "images/missing.jpg", "labels": ["blue"], "split": "train"})
    pd.DataFrame(rows).to_parquet(local / "data" / "annotations.parquet")
    (local / "taxonomy.json").write_text(json.dumps(synthetic.taxonomy(unseen=UNSEEN).to_dict()))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.put(str(local / "data"), f"{bucket}/data", recursive=True)
    fs.put(str(local / "taxonomy.json"), f"{bucket}/taxonomy.json")
    return {
        "annotations": f"s3://{bucket}/data/annotations.parquet",
        "taxonomy": f"s3://{bucket}/taxonomy.json",
        "rows": rows,
        "bucket": bucket,
    }


@pytest.fixture(scope="module")
def trained(ray_cluster, s3_dataset, tmp_path_factory):
    from pipelines.train import TrainConfig, train

    workdir = tmp_path_factory.mktemp("work")
    cfg = TrainConfig(
        annotations=s3_dataset["annotations"],
        taxonomy=s3_dataset["taxonomy"],
        backbone="mumic-tiny",
        train_mode="image",
        workers=2,
        epochs=EPOCHS,
        batch_size=8,  # per worker: 16 per step, as the plain-loop calibration
        lr_image=3e-3,
        warmup_steps=10,
        workdir=str(workdir),  # mlflow.db
        storage_path=f"s3://{s3_dataset['bucket']}/ray_results",  # checkpoints: any node could resume them
        artifact_location=f"s3://{s3_dataset['bucket']}/mlflow",  # MLflow artifacts, registered models
        run_name="e2e",
        register=MODEL_NAME,
        fault={"rank": 1, "epoch": 2, "marker": str(workdir / "fault.marker")},
    )
    result = train(cfg)
    return result, cfg, workdir


def _client(result):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=result.tracking_uri)


def test_two_cpu_workers_beat_the_label_prior_baseline_by_0_3_map(trained, s3_dataset):
    result, cfg, _ = trained
    taxonomy = synthetic.taxonomy(unseen=UNSEEN)
    ann = annotations.load(s3_dataset["annotations"], taxonomy).without(["broken", "missing"])
    train_part, val_part = ann.split("train"), ann.split("val")
    prior = metrics.label_prior_scores(train_part.label_matrix(), len(val_part), mask=train_part.known_mask())
    baseline = metrics.mean_average_precision(prior, val_part.label_matrix(), mask=val_part.known_mask())
    model_map = result.val.metrics["map"]
    print(
        f"\nval macro mAP {model_map:.4f} vs label-prior baseline {baseline:.4f} (+{model_map - baseline:.4f})"
    )
    assert result.val.metrics["baseline_map"] == pytest.approx(baseline)
    assert result.val.metrics["n_images"] == N_VAL
    assert model_map >= baseline + 0.3


def test_worker_killed_in_epoch_2_resumes_from_last_checkpoint_and_registers_once(trained):
    result, cfg, workdir = trained
    assert (workdir / "fault.marker").read_text().startswith("rank 1 exited in epoch 2")
    assert result.epochs == EPOCHS
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    steps_per_epoch = {h["train_samples"] for h in result.history}
    assert len(steps_per_epoch) == 1  # the resumed epoch trained on a full shard, like the others
    client = _client(result)
    logged = client.get_metric_history(result.run_id, "val_map")
    assert sorted(m.step for m in logged) == list(range(1, EPOCHS + 1))  # every epoch logged exactly once
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert (
        str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version) == result.model_version == "1"
    )


def test_unreadable_images_are_counted_logged_and_skipped(trained):
    result, _, _ = trained
    assert result.unreadable == 2
    client = _client(result)
    assert client.get_run(result.run_id).data.params["n_unreadable"] == "2"
    local = client.download_artifacts(result.run_id, "inputs/unreadable_images.csv")
    bad = pd.read_csv(local).set_index("image_id")["error"].to_dict()
    assert bad["missing"].startswith("not_found") and bad["broken"].startswith("not_an_image")


def test_registered_version_loads_by_alias_with_the_checkpoint_scores(trained, s3_dataset):
    import mlflow

    from pipelines.registry import resolve_model, tracking

    result, _, _ = trained
    test_rows = [r for r in s3_dataset["rows"] if r["split"] == "test"][:12]
    base = f"s3://{s3_dataset['bucket']}/data"
    uris = [storage.join(base, r["uri"]) for r in test_rows] + [storage.join(base, "images/missing.jpg")]

    saved = checkpoint.load(result.model_dir)  # the best checkpoint's model folder, as Ray stored it
    size = saved.config.image_size
    pixels = np.stack([load_for_model(storage.read_bytes(u), size) for u in uris[:-1]])
    expected = saved.score(pixels).numpy()

    with tracking.fluent(result.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    frame = pyfunc.predict(pd.DataFrame({"uri": uris}))
    names = synthetic.taxonomy().names
    assert list(frame.columns) == [*names, "error"]
    np.testing.assert_allclose(frame[names].to_numpy()[:-1], expected, atol=1e-5)
    assert frame["error"].iloc[-1].startswith("not_found") and frame[names].iloc[-1].isna().all()

    os.environ["MLFLOW_TRACKING_URI"] = result.tracking_uri
    try:
        ref = resolve_model(f"models:/{MODEL_NAME}@candidate")
        by_version = resolve_model(f"models:/{MODEL_NAME}/{result.model_version}")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert (ref.name, ref.version) == (MODEL_NAME, "1") and by_version.uri == ref.uri
    assert ref.uri.startswith(f"s3://{s3_dataset['bucket']}/mlflow/")  # read in place by retag actors
    assert result.model_dir.startswith(f"s3://{s3_dataset['bucket']}/ray_results/e2e/")
    np.testing.assert_allclose(checkpoint.load(ref.uri).score(pixels).numpy(), expected, atol=1e-6)


def _val_split(s3_dataset):
    """The readable validation rows as training saw them (unseen labels dropped and masked out)."""
    taxonomy = synthetic.taxonomy(unseen=UNSEEN)
    return annotations.load(s3_dataset["annotations"], taxonomy).without(["broken", "missing"]).split("val")


def test_thresholds_tuned_on_validation_are_saved_with_the_model(trained, s3_dataset):
    from mumic_core.scoring import Scorer

    result, _, _ = trained
    cfg = checkpoint.read_config(result.model_dir)
    thresholds = dict(zip(synthetic.taxonomy().names, cfg["thresholds"], strict=True))
    assert thresholds["yellow"] == 0.5  # unseen: no validation truth, default kept
    assert any(abs(t - 0.5) > 1e-3 for name, t in thresholds.items() if name != "yellow")
    assert cfg["epoch"] == result.best_epoch

    # Recompute them: the worker tunes on the best epoch's validation scores, then saves the model with
    # those weights; thresholds do not change scores, so the saved model gives the same validation scores.
    val = _val_split(s3_dataset)
    assert len(val) == N_VAL
    scorer = Scorer.load(result.model_dir, device="cpu")
    pixels = np.stack([scorer.pixels(storage.read_bytes(u)) for u in val.frame["uri"]])
    scores = scorer.predict(pixels).scores
    labels, mask = val.label_matrix(), val.known_mask()
    expected = metrics.tune_thresholds(scores, labels, mask=mask)
    np.testing.assert_allclose(np.asarray(cfg["thresholds"]), expected, atol=1e-5)
    np.testing.assert_allclose(scorer.thresholds, expected, atol=1e-5)  # what the model scores with
    # ... and those are the scores the best epoch was validated (and selected) on
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    val_report = metrics.evaluate_all(scores, labels, class_names=scorer.names, mask=mask)
    for key in metrics.HEADLINE:
        assert best[f"val_{key}"] == pytest.approx(val_report[key], abs=1e-5), key


def test_mlflow_run_holds_config_metrics_and_report_artifacts_but_no_secrets(trained):
    result, cfg, _ = trained
    client = _client(result)
    run = client.get_run(result.run_id)
    params = run.data.params
    assert params["backbone"] == "mumic-tiny" and params["workers"] == "2" and params["train_mode"] == "image"
    assert params["n_train"] == str(N_TRAIN) and params["taxonomy_sha256"]
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"] in v for v in params.values())
    assert "fault" not in params
    for key in (
        "val_map",
        "val_gap_at_10",
        "test_map",
        "test_f1_at_3",
        "test_zsl_map",
        "test_gzsl_map",
        "best_val_baseline_map",
        "best_val_map",
        "val_ap/red",
        "loss",
        "samples_per_s",
    ):
        assert key in run.data.metrics, key
    files = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
    for name in (
        "per_class_ap.csv",
        "per_class_ap.png",
        "pr_curves.png",
        "confused_pairs.csv",
        "taxonomy.json",
        "metrics.json",
        "history.json",
    ):
        assert f"evaluation/{name}" in files
    assert run.info.status == "FINISHED"
    version = client.get_model_version(MODEL_NAME, result.model_version)
    assert version.run_id == result.run_id and version.tags["eval_split"] == "test"
    assert float(version.tags["metric.gap_at_10"]) == pytest.approx(result.test.metrics["gap_at_10"])


def test_mumic_evaluate_prints_metrics_and_zero_shot_scores_for_unseen_labels(
    trained, s3_dataset, capsys, monkeypatch
):
    from jobs.cli import main

    result, _, workdir = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(
        [
            "evaluate",
            "--annotations",
            s3_dataset["annotations"],
            "--model",
            f"models:/{MODEL_NAME}@candidate",
            "--split",
            "test",
            "--workdir",
            str(workdir),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"model {MODEL_NAME} version 1" in out
    assert "test: map " in out and "gap_at_10" in out and "f1_at_5" in out
    assert "zsl_map" in out and "gzsl_map" in out
    assert "yellow" in out  # per-class AP, the unseen label included
    printed, per_class, positives, n_images = _parse_evaluate_output(out)

    # The same numbers, computed here: the registered model scores the test split through Scorer, and
    # mumic_core.metrics (evaluate_all, zsl_gzsl) turns the scores into metrics.
    from mumic_core.scoring import Scorer
    from mumic_core.taxonomy import Taxonomy
    from pipelines.registry import resolve_model

    ref = resolve_model(f"models:/{MODEL_NAME}@candidate", tracking_uri=result.tracking_uri)
    taxonomy = Taxonomy.from_dict(checkpoint.read_config(ref.uri)["taxonomy"])
    assert [lb.name for lb in taxonomy.labels if lb.unseen] == list(UNSEEN)
    test = annotations.load(s3_dataset["annotations"], taxonomy, drop_unseen=False, require=()).split("test")
    assert len(test) == N_TEST
    scorer = Scorer.load(ref.uri, device="cpu")
    scores = scorer.predict(np.stack([scorer.pixels(storage.read_bytes(u)) for u in test.frame["uri"]])).scores
    labels, mask = test.label_matrix(), test.known_mask()
    expected = metrics.evaluate_all(scores, labels, class_names=taxonomy.names, mask=mask)
    unseen = np.asarray(taxonomy.unseen_mask, dtype=bool)
    expected.update(metrics.zsl_gzsl(scores, labels, unseen, mask=mask))

    assert n_images == N_TEST
    want = (*metrics.HEADLINE, "zsl_map", "zsl_f1_at_3", "gzsl_map", "gzsl_f1_at_3")
    assert set(want) <= set(printed), sorted(printed)
    for key, value in printed.items():  # printed with 4 decimals
        assert value == pytest.approx(expected[key], abs=1e-4), key
    assert list(per_class) == taxonomy.names
    for name, ap in per_class.items():
        assert ap == pytest.approx(expected["per_class_ap"][name], abs=1e-4, nan_ok=True), name
    assert not np.isnan(per_class["yellow"])  # the unseen label has positives in the test split
    assert positives == dict(zip(taxonomy.names, (int(v) for v in (labels * mask).sum(axis=0)), strict=True))
    from mlflow import MlflowClient

    runs = MlflowClient(result.tracking_uri).search_runs(
        [MlflowClient(result.tracking_uri).get_experiment_by_name("mumic-evaluate").experiment_id]
    )
    assert runs and "test_map" in runs[0].data.metrics
    logged = runs[0].data.metrics
    for key in want:
        assert logged[f"test_{key}"] == pytest.approx(expected[key], abs=1e-5), key


def _parse_evaluate_output(out: str) -> tuple[dict, dict, dict, int]:
    """`mumic evaluate` text → (metric → value, label → AP (NaN for n/a), label → positives, n_images)."""
    import math
    import re

    lines = out.splitlines()
    (headline,) = [ln for ln in lines if ln.startswith("test: ")]
    printed = {k: float(v) for k, v in re.findall(r"(\w+) (-?\d+\.\d{4}|nan)\b", headline)}
    n_images = int(re.search(r"\((\d+) images\)", headline).group(1))
    for ln in lines:
        m = re.fullmatch(r"((?:zsl|gzsl)_\w+) (-?\d+\.\d{4}|nan)", ln.strip())
        if m:
            assert float(m.group(2)) == pytest.approx(printed.get(m.group(1), float(m.group(2))), nan_ok=True)
            printed[m.group(1)] = float(m.group(2))
    per_class, positives = {}, {}
    for ln in lines:
        m = re.fullmatch(r"  (.+?)\s+AP\s+(\S+)\s+\((\d+) positives\)", ln)
        if m:
            per_class[m.group(1)] = math.nan if m.group(2) == "n/a" else float(m.group(2))
            positives[m.group(1)] = int(m.group(3))
    return printed, per_class, positives, n_images


def test_rerunning_the_same_run_name_resumes_and_registers_nothing_new(trained, capfd):
    from pipelines.train import train

    result, cfg, _ = trained
    client = _client(result)
    per_epoch = ("val_map", "loss", "train_samples", "train_seconds")
    logged_before = {k: _metric_history(client, result.run_id, k) for k in per_epoch}
    checkpoints_before = _checkpoint_objects(cfg)
    assert sum(k.endswith("/train_state.json") for k in checkpoints_before) >= 1

    cfg.fault = None
    capfd.readouterr()
    again = train(cfg)  # the finished run's checkpoints hold every epoch: nothing trains again
    printed = "".join(capfd.readouterr())
    assert f"run {cfg.run_name!r} has all {EPOCHS} epochs checkpointed: nothing to train, no worker group" in printed
    assert "Started training worker group" not in printed
    assert again.run_id == result.run_id
    assert again.epochs == EPOCHS and again.model_version == result.model_version
    assert len(_client(result).search_model_versions(f"name = '{MODEL_NAME}'")) == 1

    # A full retrain would also give 4 epochs; resuming gives the *same* epochs. Every per-epoch record
    # (loss, val metrics, and the wall-clock seconds no retrain could reproduce) is the first run's.
    assert [h["epoch"] for h in again.history] == list(range(1, EPOCHS + 1))
    assert again.history == result.history
    for h in again.history:
        assert h["train_seconds"] > 0 and "val_map" in h and "loss" in h
    # nothing was trained, validated or checkpointed again: no epoch was logged twice to MLflow, and the
    # checkpoint objects in S3 are the very same (same keys, same ETags)
    for key in per_epoch:
        assert _metric_history(client, result.run_id, key) == logged_before[key], key
    assert [v for _, v, _ in logged_before["val_map"]] == pytest.approx([h["val_map"] for h in result.history])
    assert _checkpoint_objects(cfg) == checkpoints_before
    # the same best checkpoint, evaluated to the same numbers
    assert (again.best_epoch, again.model_dir) == (result.best_epoch, result.model_dir)
    for key in metrics.HEADLINE:
        assert again.val.metrics[key] == pytest.approx(result.val.metrics[key], abs=1e-6), key
        assert again.test.metrics[key] == pytest.approx(result.test.metrics[key], abs=1e-6), key


def _metric_history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def _checkpoint_objects(cfg) -> dict[str, str]:
    """{key: ETag} of every checkpoint file (train state, optimizer, model folder) of the run in S3."""
    import boto3

    from pipelines.train import STATE

    bucket, prefix = cfg.storage_path.removeprefix("s3://").split("/", 1)
    prefix = f"{prefix.rstrip('/')}/{cfg.run_name}/"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith(f"/{STATE}") or "/optimizer." in key or "/model/" in key:
                objects[key] = obj["ETag"]
    return objects
