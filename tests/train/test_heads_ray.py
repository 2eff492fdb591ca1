"""Every head end to end on a real Ray cluster and a real MLflow sqlite store: 2 CPU workers train it on
generated images, the best epoch is registered, loaded by its alias, re-tags a catalog into the Delta
tables (every contract column), serves `mumic tag --labels` and the pyfunc, and survives a save/load
round trip with identical scores. MKT runs both its stages, and stage 2 alone from a registered stage-1
model (an untrained MKT model, registered by the test).

One short training run per head (module fixture, 1 epoch per stage: plumbing, not quality).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_core import checkpoint, synthetic
from mumic_core.heads import HEAD_NAMES
from mumic_core.scoring import Scorer

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL, N_TEST = 96, 32, 16
UNSEEN = ("yellow",)
ZERO_SHOT = ["purple", "sea view"]  # in no taxonomy: scored through the text tower only
LOSS_PARTS = {"mumic": set(), "clip_decoder": {"loss_clip", "loss_asl"}, "mkt": {"loss_rank"}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads-data")
    rows = synthetic.write_dataset(folder / "data", N_TRAIN + N_VAL + N_TEST, seed=13, size=64)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
    pd.DataFrame(rows).to_parquet(folder / "data" / "annotations.parquet")
    (folder / "taxonomy.json").write_text(json.dumps(synthetic.taxonomy(unseen=UNSEEN).to_dict()))
    test_rows = [r for r in rows if r["split"] == "test"]
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in test_rows], "uri": [r["uri"] for r in test_rows]}),
        folder / "data" / "catalog.parquet",
    )
    return {"folder": folder, "rows": rows, "test_rows": test_rows}


def _config(head: str, dataset, workdir, **kw):
    from pipelines.train import TrainConfig

    return TrainConfig(
        annotations=str(dataset["folder"] / "data" / "annotations.parquet"),
        taxonomy=str(dataset["folder"] / "taxonomy.json"),
        backbone="mumic-tiny",
        head=head,
        train_mode="image",  # mkt's stages decide for themselves
        workers=kw.pop("workers", 2),
        epochs=1,
        batch_size=8,
        lr_image=3e-3,
        lr_text=3e-3,
        warmup_steps=2,
        workdir=str(workdir),
        register=f"tiny-{head}",
        **kw,
    )


@pytest.fixture(scope="module", params=HEAD_NAMES)
def trained(request, ray_cluster, dataset, tmp_path_factory):
    from pipelines.train import train

    head = request.param
    workdir = tmp_path_factory.mktemp(f"work-{head}")
    cfg = _config(head, dataset, workdir, run_name=f"heads-{head}")
    return head, train(cfg), workdir


def _pixels(scorer: Scorer, dataset) -> np.ndarray:
    folder = dataset["folder"] / "data"
    return np.stack([scorer.pixels((folder / r["uri"]).read_bytes()) for r in dataset["test_rows"]])


def test_each_head_trains_its_stages_on_two_workers_and_logs_its_options_and_loss_terms(trained):
    from mlflow import MlflowClient

    head, result, _ = trained
    stages = [h["stage"] for h in result.history]
    assert stages == ([1, 2] if head == "mkt" else [1])
    assert all(np.isfinite(h["loss"]) for h in result.history)
    first = result.history[0]
    assert LOSS_PARTS[head] <= set(first), sorted(first)
    if head == "mkt":
        assert "loss_distill" in first and "loss_distill" not in result.history[1]  # stage 2: ranking only
    params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert params["head"] == head and params["workers"] == "2"
    assert params["decoder_alpha"] == "1.0" and params["mkt_top_k"] == "16"
    saved = checkpoint.read_config(result.model_dir)["model"]
    assert saved["head"] == head
    if head == "mkt":
        assert saved["head_options"]["prompt_tuned"] == (result.best_epoch == 2)


def test_registered_version_loads_by_alias_and_round_trips_with_identical_scores(trained, dataset, tmp_path):
    from pipelines.registry import resolve_model

    head, result, _ = trained
    ref = resolve_model(f"models:/tiny-{head}@candidate", tracking_uri=result.tracking_uri)
    assert (ref.name, ref.version) == (f"tiny-{head}", result.model_version)
    model = checkpoint.load(ref.uri)
    assert model.config.head == head
    checkpoint.save(model, tmp_path / "again")
    again = checkpoint.load(tmp_path / "again")
    scorer, scorer_again = Scorer(model, device="cpu"), Scorer(again, device="cpu")
    x = _pixels(scorer, dataset)
    a, b = scorer.predict(x), scorer_again.predict(x)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(
        scorer.predict(x, ZERO_SHOT).scores, scorer_again.predict(x, ZERO_SHOT).scores
    )
    np.testing.assert_allclose(np.linalg.norm(a.embeddings, axis=1), 1.0, atol=1e-5)
    assert a.embeddings.shape[1] == model.embed_dim


def test_pyfunc_by_alias_serves_the_taxonomy_and_zero_shot_labels(trained, dataset):
    import mlflow

    from pipelines.registry import tracking

    head, result, _ = trained
    with tracking.fluent(result.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/tiny-{head}@candidate")
    folder = dataset["folder"] / "data"
    blobs = [(folder / r["uri"]).read_bytes() for r in dataset["test_rows"][:6]]
    frame = pyfunc.predict(pd.DataFrame({"image": blobs}))
    zero_shot = pyfunc.predict(pd.DataFrame({"image": blobs}), params={"labels": ZERO_SHOT})
    scorer = Scorer.load(result.model_dir, device="cpu")
    x = np.stack([scorer.pixels(b) for b in blobs])
    names = synthetic.taxonomy().names
    np.testing.assert_allclose(frame[names].to_numpy(), scorer.predict(x).scores, atol=1e-5)
    np.testing.assert_allclose(
        zero_shot[ZERO_SHOT].to_numpy(), scorer.predict(x, ZERO_SHOT).scores, atol=1e-5
    )


def test_mumic_tag_scores_any_labels_with_the_registered_head(trained, dataset, capsys, monkeypatch):
    from jobs.cli import main

    head, result, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    image = dataset["folder"] / "data" / dataset["test_rows"][0]["uri"]
    labels = ["red", *ZERO_SHOT]
    code = main(
        [
            "tag",
            str(image),
            "--model",
            f"models:/tiny-{head}@candidate",
            "--labels",
            ",".join(labels),
            "--top-k",
            "3",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads(out.strip().splitlines()[-1])
    assert list(record["scores"]) == labels and record["model"] == f"tiny-{head}/{result.model_version}"
    assert all(0 <= s <= 1 for s in record["scores"].values())
    assert [c["label"] for c in record["labels"]][:3] and len(record["labels"]) >= 3


def test_retag_with_the_registered_head_writes_every_contract_column(
    trained, dataset, ray_cluster, tmp_path, monkeypatch
):
    from pipelines import tables
    from pipelines.retag import run_retag

    head, result, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    output = tmp_path / "out"
    catalog = dataset["folder"] / "data" / "catalog.parquet"
    summary = run_retag(
        str(catalog),
        f"models:/tiny-{head}@candidate",
        str(output),
        run_id=f"r-{head}",
        top_k=2,
        progress=False,
    )
    assert summary["status"] == "committed" and summary["rows_ok"] == N_TEST and summary["rows_error"] == 0
    tags = tables.open_table(str(output / "tags")).to_pyarrow_table()
    assert [f.name for f in tags.schema] == [f.name for f in tables.TAGS_SCHEMA]
    scorer = Scorer.load(result.model_dir, device="cpu")
    x = _pixels(scorer, dataset)
    expected = scorer.predict(x)
    row_of = {r["image_id"]: i for i, r in enumerate(dataset["test_rows"])}
    c = len(synthetic.taxonomy())
    for row in tags.to_pylist():
        i = row_of[row["image_id"]]
        assert row["status"] == "ok" and row["error"] is None and len(row["content_sha256"]) == 64
        assert (row["model_name"], row["model_version"]) == (f"tiny-{head}", result.model_version)
        assert row["run_id"] == f"r-{head}" and row["run_date"] and row["processed_at"] is not None
        assert row["taxonomy_sha256"] == synthetic.taxonomy(unseen=UNSEEN).sha256
        assert len(row["scores"]) == c and len(row["embedding"]) == scorer.embed_dim
        np.testing.assert_allclose(row["scores"], expected.scores[i], atol=1e-5)
        np.testing.assert_allclose(row["embedding"], expected.embeddings[i], atol=1e-5)
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-4)
        chosen = [lb["score"] for lb in row["labels"]]
        assert len(chosen) >= 2 and chosen == sorted(chosen, reverse=True)
    current = tables.open_table(str(output / "current")).to_pyarrow_table()
    assert current.num_rows == N_TEST


def test_mkt_stage_2_alone_prompt_tunes_the_registered_model(dataset, ray_cluster, tmp_path):
    """`--stage 2 --init models:/…` continues a registered MKT model: prompt tuning only, its image side
    and text tower exactly as they were."""
    import torch

    from mumic_core.model import MuMIC
    from pipelines.registry import log_model_version, resolve_model, tracking
    from pipelines.train import TrainError, train

    # the registered model stage 2 continues: an MKT model as stage 1 leaves it (not prompt-tuned), saved
    # and registered here rather than trained (the parametrized test above trains both stages)
    torch.manual_seed(0)
    stage_1 = MuMIC.create(synthetic.taxonomy(unseen=UNSEEN), backbone="mumic-tiny", head="mkt")
    checkpoint.save(stage_1, tmp_path / "stage-1")
    uri = tracking.tracking_uri(str(tmp_path))
    client = tracking.client(uri)  # artifacts beside the store, as a training run keeps them (not ./mlruns)
    experiment = tracking.ensure_experiment(client, "mkt-stage-1", tracking.default_artifact_location(uri, str(tmp_path)))
    run_id, _ = tracking.start_run(client, experiment, "mkt-stage1")
    version = log_model_version(str(tmp_path / "stage-1"), "tiny-mkt", run_id, tracking_uri=uri)
    client.set_terminated(run_id)
    ref = f"models:/tiny-mkt/{version}"
    # one worker: two-worker DDP of both stages is the parametrized test's
    second = train(_config("mkt", dataset, tmp_path, stage=2, init=ref, run_name="mkt-stage2", workers=1))
    assert [h["stage"] for h in second.history] == [2]
    before = checkpoint.load(resolve_model(ref, tracking_uri=second.tracking_uri).uri)
    after = checkpoint.load(second.model_dir)
    assert after.config.head_options.prompt_tuned and not before.config.head_options.prompt_tuned
    old, new = before.state_dict(), after.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed <= {"head.prompt.context", "thresholds"} and "head.prompt.context" in changed
    with pytest.raises(TrainError, match="has head 'mkt'"):
        train(_config("mumic", dataset, tmp_path, init=ref, run_name="wrong-head"))
