"""The nightly job the way KubeRay runs it: a Ray head started with `ray start --head` (its own processes,
its own temp dir, its own ports), `mumic retag --config jobs/configs/nightly_retag.yaml ...` submitted to it
through the Ray Jobs API like a RayJob's submitter does, then the committed run read back from the tables.

Another Ray cluster may be running in this test session (the `ray_cluster` fixture): nothing here runs
`ray stop`, which stops every Ray on the machine. The head's process group is killed, then any process
that still carries this head's marker in its environment is killed, and only those.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "MUMIC_TEST_RAY_HEAD"
JOB_TIMEOUT_S = 240
N_IMAGES = 24


def _dashboard_missing() -> str | None:
    """The Jobs API is served by the Ray dashboard, which needs `ray[default]` (as in Ray's images)."""
    from ray._private.utils import get_dashboard_dependency_error

    error = get_dashboard_dependency_error()
    return None if error is None else f"the Ray dashboard needs ray[default] ({error})"


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_dashboard_missing()), reason=str(_dashboard_missing())),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker_value: str):
    """Processes of this user whose environment carries the marker: everything the head started."""
    import ray  # noqa: F401, I001  (first: it puts Ray's vendored psutil on sys.path)
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == marker_value:
                yield p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    import ray  # noqa: F401, I001  (first: it puts Ray's vendored psutil on sys.path)
    import psutil

    if proc.poll() is None:
        # killed, not shut down gracefully (SIGTERM took ~10 s): a test head holds nothing to save, and
        # whatever of its tree is left in another process group is found by its marker below
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    leftovers = list(_processes_of(temp_dir))
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head as its own process tree; yields the Jobs API address (the dashboard's)."""
    temp_dir = tempfile.mkdtemp(prefix="mumic-head-", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Token auth is Ray's default, with a token under ~/.ray shared by every local cluster; it is not what
    # this test is about, and this head must not depend on what another cluster of the session set up.
    env.update({MARKER: temp_dir, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `mumic`, `ray`
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        # every port of its own, so that it never meets another local cluster's
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's dashboard never answered:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        _stop_head(proc, temp_dir)


def _catalog(folder: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mumic_core import synthetic

    rows = synthetic.write_dataset(folder, N_IMAGES, seed=7)
    table = pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]})
    pq.write_table(table, folder / "catalog.parquet")
    return str(folder / "catalog.parquet")


def test_retag_submitted_through_the_ray_jobs_api_commits_one_run(
    ray_head, trained_tiny, tmp_path, monkeypatch
):
    from deltalake import DeltaTable
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, model_folder, _ = trained_tiny
    catalog = _catalog(tmp_path / "catalog")
    output = tmp_path / "out"
    run_date = "2026-11-20"
    entrypoint = shlex.join(
        [
            "mumic", "retag",
            "--config", str(ROOT / "jobs" / "configs" / "nightly_retag.yaml"),
            "--catalog", catalog,
            "--model", str(model_folder),
            "--output", str(output),
            "--run-id", f"nightly-{run_date}",
            "--run-date", run_date,
            "--json",
            "--no-progress",
        ]
    )  # fmt: skip
    # the client obeys RAY_ADDRESS over its argument: keep it on this head whatever the session set
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    client = JobSubmissionClient(ray_head)
    submission_id = client.submit_job(entrypoint=entrypoint)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    if not status.is_terminal():
        client.stop_job(submission_id)
    assert status == JobStatus.SUCCEEDED, f"job {status} after {JOB_TIMEOUT_S}s; logs:\n{logs[-4000:]}"
    assert '"status": "committed"' in logs, logs[-4000:]
    # the driver `mumic retag` started joined THIS cluster (RAY_ADDRESS set by the Jobs API), not another
    driver = client.get_job_info(submission_id).driver_info
    assert driver is not None and driver.id, (
        "the job's driver never connected to the head it was submitted to"
    )

    runs = DeltaTable(str(output / "runs")).to_pyarrow_table().to_pylist()
    assert len(runs) == 1
    (run,) = runs
    assert run["run_id"] == f"nightly-{run_date}" and run["run_date"] == run_date
    assert run["rows_ok"] == N_IMAGES and run["rows_error"] == 0 and run["rows_skipped"] == 0
    tags = DeltaTable(str(output / "tags")).to_pyarrow_table(columns=["image_id", "run_id", "status"])
    assert tags.num_rows == N_IMAGES
    assert set(tags.column("run_id").to_pylist()) == {run["run_id"]}
    assert set(tags.column("status").to_pylist()) == {"ok"}
