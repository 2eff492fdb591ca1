"""Shared fixtures: a local S3 server, one local Ray cluster, generated data and tiny models.

Expensive things (Ray, the S3 server, a trained tiny model) start once per test session.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

# Ray and deltalake read these when they start; set before anything imports them.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray workers default to nice 15: slow on a shared box


# Run first: tests of a process that starts a local Ray of its own (as on a laptop) and uses no session
# fixture. Before the session's cluster and the actors its tests leave behind exist, the newcomer's
# quickstart takes ~117 s here; later in the suite it took 150-153 s.
RUN_FIRST = ("tests/quickstart/test_quickstart.py::test_newcomer_path_quickstart_then_search_then_duckdb",)


def pytest_collection_modifyitems(config, items):
    first = [item for item in items if item.nodeid in RUN_FIRST]
    items[:] = first + [item for item in items if item.nodeid not in RUN_FIRST]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**env_vars: str) -> dict[str, str]:
    """The environment of a `mumic` process run on this session's Ray cluster the way `ray job submit
    --runtime-env-json '{"env_vars": ...}'` starts a job's entrypoint: RAY_ADDRESS, and the job's runtime
    env (Ray's RAY_JOB_CONFIG_JSON_ENV_VAR), so every worker the job starts has `env_vars` (e.g. an
    AWS_ENDPOINT_URL of the fault proxy) while the session's own workers keep theirs. Cheaper than a local
    Ray per process (~10 s each here)."""
    import json

    import ray

    job = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, **env_vars, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto server mode) on loopback; AWS_* env points every client at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket per test; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session (2 CPUs); started after the S3 env so workers inherit it."""
    import ray

    from pipelines import cluster

    if not ray.is_initialized():
        cluster.local_cluster_env()  # what `mumic` sets when it starts a local cluster
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def taxonomy():
    from mumic_core import synthetic

    return synthetic.taxonomy()


@pytest.fixture(scope="session")
def tiny_model_untrained(taxonomy):
    import torch

    from mumic_core.model import MuMIC

    torch.manual_seed(0)
    return MuMIC.create(taxonomy, backbone="mumic-tiny")


@pytest.fixture(scope="session")
def trained_tiny(taxonomy, tmp_path_factory):
    """A tiny model trained on generated images (4 epochs, ~20 s here, at most 55 s), saved as a model folder.

    Returns (model, folder, metrics on held-out generated images).
    """
    import torch

    from mumic_core import checkpoint, metrics, synthetic
    from mumic_core.images import preprocess
    from mumic_core.model import MuMIC
    from mumic_core.training import OptimConfig, fit, predict

    torch.manual_seed(0)
    model = MuMIC.create(taxonomy, backbone="mumic-tiny")
    size = model.config.image_size
    train_imgs, y_train = synthetic.make_arrays(1536, seed=1)
    test_imgs, y_test = synthetic.make_arrays(384, seed=2)
    x_train = np.stack([preprocess(im, size) for im in train_imgs])
    x_test = np.stack([preprocess(im, size) for im in test_imgs])
    # 4 epochs: held-out mAP 0.979 (6 epochs: 0.996 in 28 s; the test asks for 0.9)
    cfg = OptimConfig(epochs=4, batch_size=64, lr_image=2e-3, lr_text=2e-3)
    run = fit(model, x_train, y_train, cfg, time_budget_s=55)
    scores, _ = predict(model, x_test)
    report = metrics.evaluate_all(scores, y_test, class_names=taxonomy.names)
    report["train_seconds"] = run["seconds"]
    report["train_epochs"] = run["epochs"]
    folder = tmp_path_factory.mktemp("models") / "tiny"
    checkpoint.save(model, folder)
    return model, Path(folder), report


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_untrained, tmp_path_factory) -> Path:
    """The untrained tiny model saved as a model folder (retag tests: speed and plumbing, not quality)."""
    from mumic_core import checkpoint

    folder = tmp_path_factory.mktemp("models") / "tiny-untrained"
    checkpoint.save(tiny_model_untrained, folder)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_ref(tiny_model_dir) -> tuple[str, tuple[str, str]]:
    """The tiny model folder and the (name, version) the tables record for it."""
    from pipelines.registry import resolve_model

    mref = resolve_model(str(tiny_model_dir))
    return str(tiny_model_dir), (mref.name, mref.version)


@pytest.fixture
def fault_proxy(s3_server, monkeypatch):
    """A fault-injecting proxy (tests/faults.py) in front of the S3 server, for this test only.

    While it runs AWS_ENDPOINT_URL points at it, so every client built from the environment (and
    `storage.aws`, which caches one client per endpoint) goes through it; clients given `s3_server`
    explicitly (like `s3_bucket`'s) still reach moto directly. Use `.set_rules([faults.Rule(...)])`,
    `.clear()`, `.count(key, method)`; it stops, and moto's endpoint is restored, at teardown.
    """
    from faults import FaultProxy

    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield proxy
