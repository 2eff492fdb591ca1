"""`mumic ablate` end to end on a real Ray cluster and a real MLflow sqlite store: a tiny grid (2 cells,
1 epoch, a generated set with compositional labels, 2 of them unseen) interrupted after its first cell
(--max-runs) and resumed; then `mumic evaluate` and a `mumic train --init` warm start on its model.

Three Ray Train runs in all (two cells, one warm start); everything else reads what they left.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs.cli import main
from mumic_core import checkpoint, synthetic
from mumic_core.images import load_for_model
from mumic_core.taxonomy import Label, Taxonomy
from pipelines import annotations, storage

pytestmark = pytest.mark.slow

UNSEEN = list(synthetic.COMPOSITIONAL_UNSEEN)
CONFIG = {
    "name": "tiny-grid",
    "generate": {"n_images": 160, "seed": 0, "size": 64},
    "unseen": UNSEEN,
    "base": {"backbone": "mumic-tiny", "workers": 1, "epochs": 1, "batch_size": 16, "warmup_steps": 2,
             "lr_image": 3e-3, "lr_text": 3e-3},
    "grid": {"loss": ["plain_bce", "focal"]},
    "experiment": "ablate-test",
}


def _ablate(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["ablate", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ablated(ray_cluster, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("ablate")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = root / "ablation.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output": str(root / "out"), "workdir": str(root)}))
    first = _ablate("--config", str(config), "--max-runs", "3")
    rows_after_first = pd.read_csv(root / "out" / "results.csv")
    second = _ablate("--config", str(config))
    return {"root": root, "first": first, "second": second, "rows_after_first": rows_after_first,
            "rows": pd.read_csv(root / "out" / "results.csv"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_an_interrupted_grid_resumes_and_skips_the_runs_already_in_results_csv(ablated):
    code, out, err = ablated["first"]
    assert code == 0, err
    first = ablated["rows_after_first"]
    assert list(first["kind"]) == ["zero_shot", "linear_probe", "train"]
    assert "stopping after 3 new run(s) (max_runs); the same command continues from run 4" in err
    assert "not complete: run the same command again" in out

    code, out, err = ablated["second"]
    assert code == 0, err
    for k, (name, digest) in enumerate(zip(first["run"], first["config_hash"], strict=True), start=1):
        assert f"run {k} of 4 (" in err and f"already in results.csv (config {digest}), skipped" in err, name
    assert "run 4 of 4 (head=mumic, loss=focal, train_mode=both, seed=0, init=base)" in err
    rows = ablated["rows"]
    assert list(rows["run"]) == ["zero_shot-s0", "linear_probe-s0", "mumic-plain_bce-both-s0", "mumic-focal-both-s0"]
    kept = rows.iloc[:3][["mlflow_run_id", "seconds", "val_map"]]  # the done runs were not run again
    pd.testing.assert_frame_equal(kept, first[["mlflow_run_id", "seconds", "val_map"]])
    assert "(complete)" in out


def test_progress_shows_run_k_of_n_the_best_so_far_and_the_unseen_labels_dropped(ablated):
    _, _, err = ablated["first"]
    assert "mumic ablate: run 3 of 4 (head=mumic, loss=plain_bce, train_mode=both, seed=0, init=base)" in err
    assert "mumic ablate: run 3 of 4 done in " in err and "; best so far: " in err
    assert (
        "mumic train: open-vocabulary protocol: 2 unseen label(s) dropped from the training annotations "
        f"(scored zero-shot through the text tower): {', '.join(UNSEEN)}"
    ) in err


def test_one_parent_run_holds_every_run_as_a_child_with_its_params_and_metrics(ablated):
    from mlflow import MlflowClient

    client = MlflowClient(ablated["tracking_uri"])
    exp = client.get_experiment_by_name("ablate-test")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tiny-grid"]  # resumed by the second call, not a new one
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows = ablated["rows"].set_index("mlflow_run_id")
    assert sorted(r.info.run_id for r in children) == sorted(rows.index)
    for child in children:
        row = rows.loc[child.info.run_id]
        assert child.info.status == "FINISHED" and child.data.tags["mumic.ablation.config_hash"] == row["config_hash"]
        assert child.data.metrics["val_map" if row["kind"] != "train" else "best_val_map"] == pytest.approx(row["val_map"])
        if row["kind"] == "train":
            assert child.data.metrics["test_map"] == pytest.approx(row["test_map"])
            for key in ("test_zsl_map", "test_zsl_f1_at_3", "test_zsl_f1_at_5", "test_gzsl_map", "test_gzsl_f1_at_5"):
                assert key in child.data.metrics, key
            weighting = {"mumic-plain_bce-both-s0": "none", "mumic-focal-both-s0": "focal"}[row["run"]]
            assert child.data.params["loss_weighting"] == weighting and child.data.params["epochs"] == "1"
    by_name = {c.data.tags["mumic.ablation.run"]: c for c in children}
    assert by_name["mumic-plain_bce-both-s0"].data.params["learn_tau"] == "False"
    assert by_name["mumic-plain_bce-both-s0"].data.params["init_tau"] == "1.0"
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "ablation")}
    assert artifacts == {"ablation/results.csv", "ablation/results.md"}
    assert client.get_run(parent.info.run_id).data.tags["mumic.ablation.complete"] == "true"


def test_the_table_has_the_baselines_both_cells_and_the_open_vocabulary_columns(ablated):
    _, out, _ = ablated["second"]
    table = (ablated["root"] / "out" / "results.md").read_text()
    assert table in out
    header = table.splitlines()[0]
    for title in ("val mAP", "test mAP", "test F1@3", "ZSL mAP", "GZSL mAP"):
        assert f"| {title} |" in header
    for shown in ("| zero-shot, untrained start |", "| linear probe, frozen start |", "| trained | mumic | plain_bce |",
                  "| trained | mumic | focal |"):
        assert shown in table
    rows = ablated["rows"]
    assert rows["test_zsl_map"].notna().sum() == 3  # not the linear probe: it cannot score an unseen label
    assert rows["val_map"].between(0, 1).all() and rows["test_gzsl_map"].between(0, 1).all()


def _generated(ablated) -> tuple[str, str]:
    (folder,) = (ablated["root"] / "out" / "data").iterdir()
    return str(folder / "annotations.parquet"), str(ablated["root"] / "out" / "taxonomy.json")


def test_mumic_evaluate_prints_and_logs_zsl_and_gzsl_map_f1_at_3_and_f1_at_5(ablated, capsys):
    from mlflow import MlflowClient

    model_dir = ablated["rows"].set_index("run").loc["mumic-plain_bce-both-s0", "model_dir"]
    ann, _ = _generated(ablated)
    root = ablated["root"]
    assert main(["evaluate", "--model", model_dir, "--annotations", ann, "--split", "test", "--workdir", str(root)]) == 0
    (headline,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("test: ")]
    printed = dict(zip(headline.split()[1::2], headline.split()[2::2], strict=False))
    client = MlflowClient(ablated["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("mumic-evaluate").experiment_id])
    for key in ("zsl_map", "zsl_f1_at_3", "zsl_f1_at_5", "gzsl_map", "gzsl_f1_at_3", "gzsl_f1_at_5"):
        assert float(printed[key]) == pytest.approx(run.data.metrics[f"test_{key}"], abs=5e-5), key
    # the same test split as the training run's final evaluation: the same numbers
    row = ablated["rows"].set_index("run").loc["mumic-plain_bce-both-s0"]
    assert run.data.metrics["test_zsl_map"] == pytest.approx(row["test_zsl_map"], abs=1e-6)


def test_train_init_warm_starts_from_a_saved_model_with_an_added_and_a_dropped_label(ablated, tmp_path, capsys):
    """A tiny learning rate keeps the weights where --init left them, so the warm-started model must score
    the kept labels as the saved one did, and the new label as the saved one scores it zero-shot."""
    from mlflow import MlflowClient

    source = ablated["rows"].set_index("run").loc["mumic-focal-both-s0", "model_dir"]
    ann_uri, tax_uri = _generated(ablated)
    old = Taxonomy.load(tax_uri)
    new = Taxonomy((*[lb for lb in old.labels if lb.name != "dark background"], Label("light background")),
                   old.templates)
    frame = annotations.load(ann_uri, old, drop_unseen=False, require=()).frame
    frame["labels"] = [[n for n in names if n != "dark background"] + ([] if "dark background" in names else
                       ["light background"]) for names in frame["labels"]]
    frame.to_parquet(tmp_path / "fresh.parquet")
    (tmp_path / "taxonomy.json").write_text(json.dumps(new.to_dict()))
    tiny = ["--lr-image", "1e-12", "--lr-text", "1e-12", "--lr-head", "1e-12", "--weight-decay", "0"]
    code = main(["train", "--annotations", str(tmp_path / "fresh.parquet"), "--taxonomy", str(tmp_path / "taxonomy.json"),
                 "--init", source, "--workers", "1", "--epochs", "1", "--batch-size", "16", *tiny,
                 "--workdir", str(ablated["root"]), "--experiment", "warm-test", "--run-name", "warm", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warm start from " in captured.err and "1 new label(s), 1 dropped" in captured.err
    result = json.loads(captured.out)
    warm = checkpoint.load(result["model_dir"])
    assert warm.taxonomy.names == new.names and warm.config.backbone == "mumic-tiny"
    saved = checkpoint.load(source)
    test_rows = frame[frame["split"] == "test"].head(8)
    pixels = np.stack([load_for_model(storage.read_bytes(u), saved.config.image_size) for u in test_rows["uri"]])
    before, after = saved.score(pixels).numpy(), warm.score(pixels).numpy()
    for j, name in enumerate(new.names[:-1]):
        np.testing.assert_allclose(after[:, j], before[:, old.index(name)], atol=1e-4, err_msg=name)
    np.testing.assert_allclose(after[:, -1], saved.score_labels(pixels, ["light background"]).numpy()[:, 0], atol=1e-4)
    params = MlflowClient(ablated["tracking_uri"]).get_run(result["mlflow_run_id"]).data.params
    assert params["init"] == source and params["init_uri"] == source and params["backbone"] == "mumic-tiny"
    assert params["init_version"] == checkpoint.read_config(source)["weights_sha256"][:12]
