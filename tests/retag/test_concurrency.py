"""Runs that cannot collide or get stuck: one writer per run id (the lease), different run ids committing at
the same moment on local disk and on S3, a stale lease taken over, and a rerun that keeps its model version
when the alias moved. Writers are real processes started together; nothing is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mumic_core import synthetic
from pipelines import tables
from pipelines.retag import RetagError, run_retag
from pipelines.retag.lease import LeaseHeld, LeaseInfo, LeaseLost, RunLease, read_lease
from pipelines.retag.staging import RunStaging
from pipelines.storage import files

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 24
PROC_TIMEOUT_S = 240

# A retag driver as its own process: run_retag with a gate (it waits at the named event until the gate
# file exists, after touching `<gate>.reached`), then the summary as JSON on stdout.
DRIVER = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
from pipelines.retag import run_retag

def on_event(name, info):
    if name == cfg.get("gate_at"):
        open(cfg["gate"] + ".reached." + cfg["options"]["run_id"], "w").close()
        while not os.path.exists(cfg["gate"]):
            time.sleep(0.05)

summary = run_retag(cfg["catalog"], cfg["model"], cfg["output"], on_event=on_event, **cfg["options"])
print(json.dumps(summary, default=str))
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("catalog")
    rows = synthetic.write_dataset(folder, N_IMAGES, seed=41)
    pq.write_table(pa.Table.from_pylist([{"image_id": r["image_id"], "uri": r["uri"]} for r in rows]),
                   folder / "catalog.parquet")
    return folder / "catalog.parquet", rows


def _env(ray_address: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _driver(tmp_path: Path, cfg: dict, env: dict) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, timeout_s: float, procs=(), what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"a driver exited with {p.returncode} before {what}:\n{err[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=PROC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _committed_run_ids(tags_uri: str) -> list[str]:
    """The run ids of the commits in a Delta log, read as files (DeltaTable.history holds the GIL during
    its S3 requests, which the S3 server thread of this process then never answers)."""
    found = []
    for uri, _ in files.list_files(f"{tags_uri}/_delta_log"):
        if uri.endswith(".json"):
            for line in (files.read_text(uri) or "").splitlines():
                info = json.loads(line).get("commitInfo") or {}
                if info.get("mumic.run_id"):
                    found.append(info["mumic.run_id"])
    return found


def _ray_address(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


def _options(run_id: str) -> dict:
    # small enough for two drivers on the session's 2-CPU cluster at once
    return {"run_id": run_id, "progress": False, "concurrency": 1, "actor_cpus": 0.5, "fetch_cpus": 0.25,
            "batch_size": 8, "rows_per_part": 10}


# ---- the lease itself -----------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def lease_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_create_exclusive_has_exactly_one_winner_among_concurrent_writers(lease_root):
    uri = f"{lease_root}/_staging/r/once.json"
    won: list[bool] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        won.append(files.create_exclusive(uri, json.dumps({"writer": i}).encode()))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 1 and len(won) == 8
    data, _ = files.read_versioned(uri)
    assert json.loads(data)["writer"] in range(8)  # whole content, from the one winner


def test_a_live_lease_refuses_a_second_holder_and_a_taken_over_one_cannot_commit(lease_root):
    uri = f"{lease_root}/_staging/r1/lease.json"
    said: list[str] = []
    first = RunLease(uri, "r1").acquire()
    with pytest.raises(LeaseHeld) as held:
        RunLease(uri, "r1").acquire()
    message = str(held.value)
    assert isinstance(held.value, RetagError) and held.value.code == 2 and "\n" not in message
    assert message.startswith(f"run r1 is being written by host {first.info.host} pid {os.getpid()} since ")
    assert message.endswith(f"(lease expires {first.info.expires_at}); wait, or use another --run-id")
    assert first.renew() and read_lease(uri).holder == first.info.holder  # renewals are conditional writes

    # the first holder stalls past its expiry (written by hand: the clock is not ours to move)
    data, token = files.read_versioned(uri)
    stale = LeaseInfo(**{**json.loads(data), "expires_at": "2020-01-01T00:00:00Z"})
    assert files.replace_if_unchanged(uri, stale.to_bytes(), token)
    second = RunLease(uri, "r1", say=said.append).acquire(renew=False)
    assert said == [f"run r1: took over a stale lease of host {stale.host} pid {stale.pid} "
                    "(expired 2020-01-01T00:00:00Z)"]
    assert not first.renew()  # its version is gone: it finds out
    with pytest.raises(LeaseLost, match="taken over by host .* not committing"):
        first.check()
    assert not first.release() and read_lease(uri).holder == second.info.holder  # never deletes another's
    second.check()
    assert second.release() and read_lease(uri) is None


def test_a_lease_whose_holder_died_on_this_machine_is_taken_over_at_once(tmp_path):
    uri = str(tmp_path / "out" / "_staging" / "r2" / "lease.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process of this machine that has exited
    mine = RunLease(uri, "r2")._fresh()
    files.create_exclusive(uri, LeaseInfo(**{**mine.__dict__, "pid": pid}).to_bytes())
    said: list[str] = []
    lease = RunLease(uri, "r2", say=said.append).acquire(renew=False)  # not expired, but its holder is gone
    assert said == [f"run r2: took over the lease of host {mine.host} pid {pid}: that process is gone"]
    lease.release()


# ---- real writers ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_run_ids_at_once_on_one_output_both_commit(where, catalog, tiny_model_dir, ray_cluster, tmp_path, request):
    """Two drivers (processes) started together, held at `before_commit` until both are there, then let go
    at once: both commits land (conditional PUTs of the Delta log, no unsafe rename), none is lost."""
    catalog_path, rows = catalog
    output = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    gate = str(tmp_path / "gate")
    env = _env(_ray_address(ray_cluster))
    started = time.monotonic()
    procs = {
        run_id: _driver(tmp_path, {"catalog": str(catalog_path), "model": str(tiny_model_dir), "output": output,
                                   "options": _options(run_id), "gate_at": "before_commit", "gate": gate}, env)
        for run_id in ("night-a", "night-b")
    }
    _wait_for(lambda: all(os.path.exists(f"{gate}.reached.{r}") for r in procs), PROC_TIMEOUT_S,
              procs.values(), "both runs reach their commit")
    Path(gate).touch()  # both commit now
    results = {run_id: _finish(p) for run_id, p in procs.items()}
    wall = time.monotonic() - started
    for run_id, (code, out, err) in results.items():
        assert code == 0, f"{run_id}:\n{err[-4000:]}"
        assert json.loads(out.strip().splitlines()[-1])["status"] == "committed"
    runs = tables.open_table(f"{output}/runs").to_pyarrow_table()
    assert sorted(runs.column("run_id").to_pylist()) == ["night-a", "night-b"]
    tags = tables.open_table(f"{output}/tags")
    data = tags.to_pyarrow_table(columns=["run_id", "image_id"])
    want = sorted(r["image_id"] for r in rows)
    for run_id in procs:
        got = data.filter(pc.equal(data.column("run_id"), run_id)).column("image_id").to_pylist()
        assert sorted(got) == want, run_id  # every row of both runs, once
    assert all(tags.transaction_version(tables.retag_app_id(r)) is not None for r in procs)
    assert sorted(_committed_run_ids(f"{output}/tags")) == ["night-a", "night-b"]  # two log entries
    assert not files.list_dirs(f"{output}/_staging")
    print(f"two concurrent run ids on {where}: both committed, {wall:.1f}s wall")


@pytest.mark.slow
def test_the_same_run_id_twice_at_once_the_second_exits_2_naming_the_holder(catalog, tiny_model_dir, ray_cluster, tmp_path):
    catalog_path, rows = catalog
    output, gate = tmp_path / "out", str(tmp_path / "gate")
    env = _env(_ray_address(ray_cluster))
    first = _driver(tmp_path, {"catalog": str(catalog_path), "model": str(tiny_model_dir), "output": str(output),
                               "options": _options("nightly-x"), "gate_at": "staged", "gate": gate}, env)
    lease_uri = RunStaging(str(output), "nightly-x").lease_uri
    _wait_for(lambda: os.path.exists(lease_uri), PROC_TIMEOUT_S, [first], "the first run's lease")
    holder = read_lease(lease_uri)
    t0 = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "retag", "--catalog", str(catalog_path), "--model", str(tiny_model_dir),
         "--output", str(output), "--run-id", "nightly-x"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROC_TIMEOUT_S,
    )
    second_s = time.monotonic() - t0
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 2, second.stderr[-3000:]
    assert lines == [
        f"mumic: error: run nightly-x is being written by host {holder.host} pid {holder.pid} since "
        f"{holder.acquired_at} (lease expires {holder.expires_at}); wait, or use another --run-id"
    ]
    assert holder.pid == first.pid and first.poll() is None
    Path(gate).touch()
    code, out, err = _finish(first)
    assert code == 0, err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "committed" and summary["rows_ok"] == N_IMAGES
    assert read_lease(lease_uri) is None  # released with the commit
    print(f"second writer refused in {second_s:.1f}s (mostly imports)")


def test_a_stale_lease_is_taken_over_and_the_run_commits(catalog, tiny_model_dir, ray_cluster, tmp_path, capsys):
    catalog_path, rows = catalog
    output = tmp_path / "out"
    lease_uri = RunStaging(str(output), "stale-1").lease_uri
    stale = LeaseInfo(run_id="stale-1", holder="a-killed-driver", host="node-7", pid=4242,
                      acquired_at="2026-01-01T02:00:00Z", expires_at="2026-01-01T02:02:00Z")
    assert files.create_exclusive(lease_uri, stale.to_bytes())
    summary = run_retag(str(catalog_path), str(tiny_model_dir), str(output), run_id="stale-1", batch_size=8)
    assert summary["status"] == "committed" and summary["rows_ok"] == N_IMAGES
    err = capsys.readouterr().err
    assert ("mumic retag: run stale-1: took over a stale lease of host node-7 pid 4242 "
            "(expired 2026-01-01T02:02:00Z)") in err
    assert read_lease(lease_uri) is None and not (output / "_staging" / "stale-1").exists()


# ---- the model version of a rerun -------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _crash_at(event: str):
    def on_event(name: str, info: dict) -> None:
        if name == event:
            raise Crash(name)

    return on_event


def test_a_rerun_keeps_the_model_version_of_its_manifest_when_the_alias_moved(
    catalog, tiny_model_dir, ray_cluster, tmp_path, monkeypatch, capsys
):
    from pipelines import registry
    from pipelines.registry import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client(uri)
    exp = tracking.ensure_experiment(client, "pin-tests", tracking.default_artifact_location(uri))

    def register(label: str) -> str:
        run_id, _ = tracking.start_run(client, exp, label)
        return registry.log_model_version(str(tiny_model_dir), "pinned", run_id, tracking_uri=uri, alias="champion")

    v1 = register("first")
    catalog_path, rows = catalog
    output = tmp_path / "out"
    kw = {"run_id": "night-pin", "rows_per_part": 10, "batch_size": 8, "concurrency": 1, "progress": False}
    with pytest.raises(Crash):
        run_retag(str(catalog_path), "models:/pinned@champion", str(output), on_event=_crash_at("staged"), **kw)
    (writer,) = RunStaging(str(output), "night-pin").read_manifest()["writers"]  # who started it
    assert writer["pid"] == os.getpid() and writer["host"] and writer["holder"]
    v2 = register("second")
    client.set_registered_model_alias("pinned", "champion", v2)
    assert registry.alias_version("pinned", "champion") == v2 != v1

    summary = run_retag(str(catalog_path), "models:/pinned@champion", str(output), **{**kw, "progress": True})
    assert summary["status"] == "committed" and summary["model_version"] == v1 and summary["rows_resumed"] > 0
    assert (f"mumic retag: run night-pin: resuming with models:/pinned/{v1}, the version it started with; "
            f"@champion is now version {v2}") in capsys.readouterr().err
    tags = tables.open_table(str(output / "tags")).to_pyarrow_table(columns=["image_id", "model_version"])
    assert set(tags.column("model_version").to_pylist()) == {v1}
    assert sorted(tags.column("image_id").to_pylist()) == sorted(r["image_id"] for r in rows)
    # a new run id tags with the alias's version now
    fresh = run_retag(str(catalog_path), "models:/pinned@champion", str(output), run_id="night-new", progress=False)
    assert fresh["model_version"] == v2
