"""The registry over HTTP: a real `mlflow server` process on loopback (sqlite backend, proxied artifacts).

Registration, promotion, `models:/` resolution (artifacts downloaded once into a cache) and the pyfunc
all go through the REST API here, as they would against a shared tracking server.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from servers import start_mlflow_server, stop

from mumic_core import checkpoint, synthetic
from mumic_core.images import preprocess
from pipelines import registry
from pipelines.registry import tracking

NAME = "http-tiny"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc, port = start_mlflow_server(root, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_register_promote_resolve_and_pyfunc_over_a_real_mlflow_server(
    mlflow_server, tiny_model_untrained, tmp_path, monkeypatch
):
    import mlflow

    folder = tmp_path / "saved"
    checkpoint.save(tiny_model_untrained, folder)
    c = tracking.client(mlflow_server)
    exp = tracking.ensure_experiment(c, "http-tests", tracking.default_artifact_location(mlflow_server))
    versions = []
    for value in (0.6, 0.5):
        run_id, _ = tracking.start_run(c, exp, f"run-{value}")
        tracking.log_params(c, run_id, {"backbone": "mumic-tiny"})
        versions.append(
            registry.log_model_version(
                str(folder),
                NAME,
                run_id,
                tracking_uri=mlflow_server,
                metrics={"gap_at_10": value},
                eval_split="test",
            )
        )
    assert versions == ["1", "2"]
    assert registry.promote(NAME, "1", tracking_uri=mlflow_server).promoted
    refused = registry.promote(NAME, "2", tracking_uri=mlflow_server)
    assert not refused.promoted and "0.5000 < 0.6000" in refused.message

    # retag resolves references through pipelines.models with the tracking URI from the environment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MUMIC_CACHE_DIR", str(tmp_path / "cache"))
    ref = registry.resolve_model(f"models:/{NAME}@champion")
    assert (ref.name, ref.version) == (NAME, "1")
    assert ref.uri.startswith(str(tmp_path / "cache"))  # proxied artifacts: downloaded once
    assert registry.resolve_model(f"models:/{NAME}/1").uri == ref.uri
    model = checkpoint.load(ref.uri)
    assert (
        checkpoint.read_config(ref.uri)["weights_sha256"] == checkpoint.read_config(folder)["weights_sha256"]
    )

    images, _ = synthetic.make_arrays(4, seed=4, size=40)
    pixels = np.stack([preprocess(im, model.config.image_size) for im in images])
    blobs = []
    for im in images:
        path = tmp_path / f"{len(blobs)}.png"
        im.save(path)
        blobs.append(path.read_bytes())
    with tracking.fluent(mlflow_server):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    scores = pyfunc.predict(pd.DataFrame({"image": blobs}))
    np.testing.assert_allclose(
        scores[model.taxonomy.names].to_numpy(), tiny_model_untrained.score(pixels).numpy(), atol=1e-5
    )
