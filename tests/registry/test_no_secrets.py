"""No secret leaves: with fake credentials in the environment (S3 secret and session token, an MLflow
token) and an MLflow tracking URI carrying a password (`http://alice:PASSWORD@127.0.0.1:PORT`, a real
`mlflow server` on loopback that ignores basic auth), `mumic train`, `retag`, `evaluate` and `search`
run as the user runs them (subprocesses of the command line, on this session's Ray cluster),
and none of the secret values appears in:

- anything the commands print (stdout and stderr, Ray's worker lines included);
- any column of the `tags` / `runs` Delta tables, or any object the runs wrote (S3 and local folders);
- any MLflow run's params, tags and metric names, any model version's fields and tags, or the bytes of
  any artifact (of runs and of registered models);
- the logs of this Ray session.

`mumic quickstart` runs with fake credentials in its environment too, in the newcomer's test
(tests/quickstart/test_quickstart.py): its output, report and workdir (MLflow store included) are
checked there.

The MLflow search filters built from model and run names are checked here too, against a real sqlite
store: a name with a quote is found, an injected `x' or name = 'y` finds nothing else.

One setup (module fixture) serves every test.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port
from servers import start_mlflow_server, stop

from mumic_core import synthetic

ROOT = Path(__file__).resolve().parents[2]
S3_SECRET = "testing-secret-never-logged"  # the s3_server fixture's AWS_SECRET_ACCESS_KEY
SESSION_TOKEN = "FAKE-SESSION-TOKEN-123456"
ACCESS_KEY_ID = "AKIAFAKEKEYID0123456"  # shaped like a real one (the local S3 server accepts any)
MLFLOW_TOKEN = "FAKE-MLFLOW-TOKEN-654321"
PASSWORD = "FAKE-PASSWORD-777"
SECRETS = (
    S3_SECRET,
    ACCESS_KEY_ID,
    SESSION_TOKEN,
    MLFLOW_TOKEN,
    PASSWORD,
    base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),  # a Basic auth header's value
)
MODEL = "tiny-no-secrets"  # the registered model of `mumic train`
N_TRAIN, N_VAL, N_TEST = 96, 32, 32


def _leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else str(text).encode()
    return [s for s in SECRETS if s.encode() in data]


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen, int]:
    """The tracking server, started without the test's MLFLOW_/AWS_ settings (its own store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return start_mlflow_server(root, env)


def _dataset(bucket: str, endpoint: str, local: Path) -> dict[str, str]:
    """Generated images, annotations (explicit splits), a catalog with one missing image, a taxonomy."""
    import s3fs

    rows = synthetic.write_dataset(local / "data", N_TRAIN + N_VAL + N_TEST, seed=5, size=64)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
    pd.DataFrame(rows).to_parquet(local / "data" / "annotations.parquet")
    catalog = [{"image_id": r["image_id"], "uri": f"s3://{bucket}/data/{r['uri']}"} for r in rows[:40]]
    catalog.append({"image_id": "missing", "uri": f"s3://{bucket}/data/images/missing.jpg"})
    pd.DataFrame(catalog).to_parquet(local / "data" / "catalog.parquet")
    (local / "data" / "taxonomy.json").write_text(json.dumps(synthetic.taxonomy().to_dict()))
    s3fs.S3FileSystem(endpoint_url=endpoint).put(str(local / "data"), f"{bucket}/data", recursive=True)
    return {
        name: f"s3://{bucket}/data/{name}.{ext}"
        for name, ext in (("annotations", "parquet"), ("catalog", "parquet"), ("taxonomy", "json"))
    }


def _mumic(args: list[str], env: dict[str, str], log: list[str], timeout: float = 240) -> str:
    """One `mumic` command line as a user runs it; everything it prints is kept in `log`."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    out = proc.stdout.decode(errors="replace")
    log.append(f"$ mumic {' '.join(args)}  # {time.perf_counter() - t0:.0f} s\n{out}")
    assert proc.returncode == 0, f"mumic {args[0]} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def world(request, s3_server, tmp_path_factory):
    """The fake secrets in the environment, a tracking server behind a password URI, S3 data; then the
    commands, each run once."""
    import boto3

    root = tmp_path_factory.mktemp("no-secrets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)  # before Ray starts: its workers inherit them
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        mp.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN)
        mp.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # what a user's shell has
        proc, port = _start_mlflow_server(root)
        try:
            uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("MUMIC_CACHE_DIR", str(root / "cache"))
            ray = request.getfixturevalue("ray_cluster")
            bucket = f"nosecrets-{uuid.uuid4().hex[:10]}"
            boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
            paths = _dataset(bucket, s3_server, root / "local")
            env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
            yield _run_commands(root, bucket, paths, env, uri, s3_server)
        finally:
            stop(proc)


def _run_commands(root: Path, bucket: str, paths: dict, env: dict, uri: str, endpoint: str) -> dict:
    log: list[str] = []
    started = time.perf_counter()
    ref = f"models:/{MODEL}@candidate"
    output = f"s3://{bucket}/out"
    _mumic(
        [
            "train",
            "--annotations",
            paths["annotations"],
            "--taxonomy",
            paths["taxonomy"],
            "--backbone",
            "mumic-tiny",
            "--workers",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--workdir",
            str(root / "train"),
            "--storage-path",
            f"s3://{bucket}/ray_results",
            "--run-name",
            "no-secrets",
            "--register",
            MODEL,
            "--experiment",
            "no-secrets",
        ],
        env,
        log,
    )
    _mumic(["retag", "--catalog", paths["catalog"], "--model", ref, "--output", output, "--json"], env, log)
    # evaluate and search need only what train and retag wrote: both at once (2 cores), logged in order
    last = (
        ["evaluate", "--annotations", paths["annotations"], "--model", ref, "--workdir", str(root / "eval")],
        ["search", "--output", output, "--model", ref, "--text", "red", "--k", "5"],
    )
    logs: tuple[list[str], ...] = tuple([] for _ in last)
    with ThreadPoolExecutor(len(last)) as pool:
        for done in [pool.submit(_mumic, args, env, own) for args, own in zip(last, logs, strict=True)]:
            done.result()
    for own in logs:
        log.extend(own)
    return {
        "log": "\n".join(log),
        "root": root,
        "bucket": bucket,
        "output": output,
        "uri": uri,
        "endpoint": endpoint,
        "seconds": time.perf_counter() - started,
    }


@pytest.mark.slow
def test_nothing_the_commands_print_holds_a_secret(world):
    log = world["log"]
    assert "mumic train: MLflow run" in log and "***@127.0.0.1" in log  # the URI was shown, masked
    assert "View run" not in log  # MLflow's own line would print the URI whole
    assert _leaks(log) == [], [ln for ln in log.splitlines() if _leaks(ln)][:5]


@pytest.mark.slow
def test_no_column_of_the_tables_and_no_object_written_holds_a_secret(world):
    import s3fs

    from pipelines.tables import open_table

    for name in ("tags", "runs"):
        table = open_table(f"{world['output']}/{name}").to_pyarrow_table()
        assert table.num_rows > 0
        for column in table.column_names:
            assert _leaks(json.dumps(table.column(column).to_pylist(), default=str)) == [], (name, column)
    tags = open_table(f"{world['output']}/tags").to_pandas()
    assert (tags["status"] == "error").sum() == 1  # the missing image: its error line is stored too
    fs = s3fs.S3FileSystem(endpoint_url=world["endpoint"])
    objects = [k for k in fs.find(world["bucket"]) if "/data/images/" not in k]
    assert any("/out/tags/_delta_log/" in k for k in objects) and any("ray_results" in k for k in objects)
    assert [k for k in objects if _leaks(fs.cat_file(k)) or _leaks(k)] == []
    folders = ("train", "eval", "cache")  # mlflow.db-less workdirs, checkpoints
    files = [p for name in folders for p in (world["root"] / name).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)  # the model cache (the rest went to S3)
    assert [p for p in files if _leaks(p.read_bytes()) or _leaks(str(p))] == []


def _every_artifact(c, run_id: str, dst: Path) -> list[Path]:
    local = c.download_artifacts(run_id, "", str(dst))
    return [p for p in Path(local).rglob("*") if p.is_file()]


@pytest.mark.slow
def test_no_mlflow_run_version_or_artifact_holds_a_secret(world, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry import tracking

    c = MlflowClient(tracking_uri=world["uri"])
    runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]
    kinds = sorted({r.data.tags.get("mumic.kind", "") for r in runs})
    assert kinds == ["evaluate", "train"] and len(runs) >= 2  # train, evaluate
    files = []
    for r in runs:
        data = r.data
        text = json.dumps([str(r.info), data.params, data.tags, sorted(data.metrics)])
        assert _leaks(text) == [], r.info.run_name
        files += _every_artifact(c, r.info.run_id, tmp_path / r.info.run_id)
    models = c.search_registered_models()
    versions = [v for m in models for v in c.search_model_versions(f"name = {tracking.filter_value(m.name)}")]
    assert {v.name for v in versions} == {MODEL}
    assert _leaks(str(models)) == []
    for v in versions:
        assert _leaks(json.dumps([str(v), v.source, v.run_link, v.tags, v.aliases])) == []
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{v.name}/{v.version}",
            dst_path=str(tmp_path / f"{v.name}-{v.version}"),
            tracking_uri=world["uri"],
        )
        files += [p for p in Path(local).rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files) and any(p.name == "metrics.json" for p in files)
    assert [p for p in files if _leaks(p.read_bytes())] == []


@pytest.mark.slow
def test_the_ray_session_logs_hold_no_secret(world):
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert files
    leaked = {str(p.relative_to(session)): _leaks(p.read_bytes()) for p in files}
    assert {k: v for k, v in leaked.items() if v} == {}


# --- search filters built from names: quoted, never injected (a real sqlite MLflow store) ---------------

QUOTED = ("it's", 'say "hi"', "y' and name = 'y", "back\\slash")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the filter tests (each uses its own names)."""
    from pipelines.registry import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('quotes')}/mlflow.db"
    return uri, tracking.client(uri)


def test_model_names_with_quotes_resolve_to_their_own_versions_only(store, tmp_path):
    from pipelines.registry import get_version

    uri, c = store
    for name in ("y", *QUOTED):
        c.create_registered_model(name)
    for _ in range(2):  # "y" has 2 versions: a filter that leaked into it would answer version 2
        c.create_model_version("y", source=str(tmp_path / "y"))
    for name in QUOTED:
        c.create_model_version(name, source=str(tmp_path / "q"))
    assert get_version("y", version="latest", tracking_uri=uri).version == 2
    for name in QUOTED:
        mv = get_version(name, version="latest", tracking_uri=uri)
        assert (mv.name, int(mv.version)) == (name, 1)


def test_a_name_that_cannot_be_quoted_is_refused_in_one_line(store):
    from mumic_core.model import ModelError
    from pipelines.registry import get_version, tracking

    uri, c = store
    c.create_registered_model("both'\"")
    for bad in ("both'\"", "ends\\"):
        with pytest.raises(ModelError, match="cannot be searched for") as err:
            get_version(bad, version="latest", tracking_uri=uri)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="run name"):
        tracking.start_run(c, "0", "a'b\"c")


def test_run_names_with_quotes_resume_their_own_run_only(store):
    from pipelines.registry import tracking

    _, c = store
    exp = tracking.ensure_experiment(c, "quotes")
    other, resumed = tracking.start_run(c, exp, "y")
    assert not resumed
    injected = "y' and tags.`mumic.run_name` = 'y"  # unquoted, this filter would find run "y"
    for name in ("it's", injected):
        first, resumed = tracking.start_run(c, exp, name)
        assert not resumed and first != other
        again, resumed = tracking.start_run(c, exp, name)
        assert resumed and again == first
        assert c.get_run(first).data.tags[tracking.RUN_NAME_TAG] == name


def test_registering_under_a_quoted_name_is_idempotent_per_run(store, tiny_model_dir):
    from pipelines.registry import log_model_version, tracking

    uri, c = store
    exp = tracking.ensure_experiment(c, "quotes-register", tracking.default_artifact_location(uri))
    run_id, _ = tracking.start_run(c, exp, "register")
    name = "it's tiny"
    assert log_model_version(str(tiny_model_dir), name, run_id, tracking_uri=uri) == "1"
    assert log_model_version(str(tiny_model_dir), name, run_id, tracking_uri=uri) == "1"  # found, not twice
    assert str(c.get_model_version_by_alias(name, "candidate").version) == "1"


def test_mlflow_errors_never_carry_the_password_of_the_uri(monkeypatch):
    import traceback

    from pipelines.registry import tracking

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # restored afterwards
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(tracking.mlflow_error()) as err:
        tracking.client(uri).search_experiments()
    shown = "".join(traceback.format_exception(err.value))
    assert "API request to http://alice:***@127.0.0.1" in shown and _leaks(shown) == []
