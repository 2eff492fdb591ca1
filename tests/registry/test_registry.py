"""The model registry on a real MLflow sqlite store: registration, references, promotion, the pyfunc."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from mumic_core import checkpoint, synthetic
from mumic_core.images import load_for_model
from mumic_core.model import ModelError
from mumic_core.scoring import Scorer
from pipelines import registry
from pipelines.registry import tracking

NAME = "reg-tiny"


@pytest.fixture(scope="module")
def model_folder(tiny_model_untrained, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    checkpoint.save(tiny_model_untrained, folder)
    return str(folder)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store; MLFLOW_TRACKING_URI points at it as a user's shell would."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _register(uri: str, folder: str, gap_at_10: float, alias: str | None = "candidate") -> str:
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "registry-tests", tracking.default_artifact_location(uri))
    run_id, _ = tracking.start_run(c, exp, f"run-{gap_at_10}")
    return registry.log_model_version(
        folder,
        NAME,
        run_id,
        tracking_uri=uri,
        alias=alias,
        metrics={"gap_at_10": gap_at_10, "map": gap_at_10 - 0.1},
        eval_split="test",
    )


def test_alias_and_version_references_resolve_to_the_registered_model_folder(store, model_folder):

    version = _register(store, model_folder, 0.8)
    ref = registry.resolve_model(f"models:/{NAME}@candidate")  # through pipelines.models, as retag calls it
    assert (ref.name, ref.version) == (NAME, version)
    assert registry.resolve_model(f"models:/{NAME}/{version}").uri == ref.uri
    assert registry.resolve_model(f"models:/{NAME}/latest").version == version
    # a local artifact store is used in place: no copy
    assert ref.uri.startswith(tracking.default_artifact_location(store)) and ref.uri.endswith(
        registry.MODEL_FOLDER
    )
    saved, registered = checkpoint.read_config(model_folder), checkpoint.read_config(ref.uri)
    assert registered["weights_sha256"] == saved["weights_sha256"]


def test_missing_alias_version_or_bad_reference_is_one_line_model_error(store, model_folder):
    _register(store, model_folder, 0.8)
    for ref, match in (
        (f"models:/{NAME}@champion", "has no alias 'champion'"),
        (f"models:/{NAME}/7", "has no version 7"),
        ("models:/nope@candidate", "'nope'"),
        (f"models:/{NAME}/v2", "VERSION must be a number"),
    ):
        with pytest.raises(ModelError, match=match) as err:
            registry.resolve_model(ref)
        assert "\n" not in str(err.value)


def test_registering_again_from_the_same_run_returns_the_existing_version(store, model_folder):
    c = tracking.client(store)
    exp = tracking.ensure_experiment(c, "registry-tests", tracking.default_artifact_location(store))
    run_id, _ = tracking.start_run(c, exp, "once")
    first = registry.log_model_version(
        model_folder, NAME, run_id, tracking_uri=store, metrics={"gap_at_10": 0.5}
    )
    again = registry.log_model_version(
        model_folder, NAME, run_id, tracking_uri=store, metrics={"gap_at_10": 0.5}
    )
    assert first == again == "1"
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 1


def test_promotion_refuses_a_worse_version_and_accepts_a_better_one(store, model_folder, capsys):
    from jobs.cli import main

    v1 = _register(store, model_folder, 0.80)
    first = registry.promote(NAME, v1)  # no champion yet
    assert first.promoted and registry.alias_version(NAME, "champion") == v1

    v2 = _register(store, model_folder, 0.70)
    code = main(["promote", "--name", NAME, "--version", v2])
    err = capsys.readouterr().err
    assert code == 1
    ours = [line for line in err.splitlines() if line.startswith("mumic")]
    assert len(ours) == 1 and "refused" in ours[0] and "0.7000" in ours[0] and "0.8000" in ours[0]
    assert registry.alias_version(NAME, "champion") == v1  # a refusal changes nothing

    v3 = _register(store, model_folder, 0.85)
    assert main(["promote", "--name", NAME, "--version", v3, "--metric", "gap_at_10"]) == 0
    assert "promoted" in capsys.readouterr().out
    assert registry.alias_version(NAME, "champion") == v3

    # on another metric, and with --force
    assert not registry.promote(NAME, v2, metric="map").promoted
    assert main(["promote", "--name", NAME, "--version", v2, "--force"]) == 0
    assert registry.alias_version(NAME, "champion") == v2
    with pytest.raises(ModelError, match="has no metric 'f1_at_3'"):
        registry.promote(NAME, v1, metric="f1_at_3")


def test_pyfunc_scores_image_uris_and_bytes_like_the_model(store, model_folder, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MUMIC_ALLOWED_ROOTS", str(tmp_path))  # the folder the served model may read
    _register(store, model_folder, 0.8)
    model = checkpoint.load(model_folder)
    images, _ = synthetic.make_arrays(5, seed=9, size=48)
    blobs = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
        (tmp_path / f"{i}.png").write_bytes(blobs[-1])
    pixels = np.stack([load_for_model(b, model.config.image_size) for b in blobs])
    expected = model.score(pixels).numpy()

    with tracking.fluent(store):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    by_uri = pyfunc.predict(pd.DataFrame({"uri": [str(tmp_path / f"{i}.png") for i in range(5)]}))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": blobs + [b"not an image"]}))
    names = model.taxonomy.names
    np.testing.assert_allclose(by_uri[names].to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(by_bytes[names].to_numpy()[:5], expected, atol=1e-5)
    assert by_bytes["error"].iloc[-1].startswith("not_an_image") and by_uri["error"].isna().all()
    labels = ["purple", "red"]
    zero_shot = pyfunc.predict(pd.DataFrame({"image": blobs + [b"not an image"]}), params={"labels": labels})
    assert list(zero_shot.columns) == ["purple", "red", "error"]
    # the zero-shot values are the scorer's own for those label strings, not the taxonomy's columns
    scorer = Scorer.load(model_folder, device="cpu")
    expected_zs = scorer.predict(np.stack([scorer.pixels(b) for b in blobs]), labels=labels).scores
    assert expected_zs.shape == (5, 2)
    np.testing.assert_allclose(zero_shot[labels].to_numpy()[:5], expected_zs, atol=1e-5)
    assert zero_shot[labels].iloc[-1].isna().all() and zero_shot["error"].iloc[-1].startswith("not_an_image")
    assert zero_shot["error"].iloc[:5].isna().all()
    # the prompt-templated label "red" scored zero-shot is the taxonomy's own "red" column
    np.testing.assert_allclose(zero_shot["red"].to_numpy()[:5], expected[:, names.index("red")], atol=1e-5)
