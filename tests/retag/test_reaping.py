"""No process of a killed run is left behind: a retag driver that started its own local Ray is SIGKILLed
mid-run, Ray's agents outlive it, and the resume (a real `mumic retag` process) reaps them before it starts
its own cluster, then finishes the run exactly once. Processes of a live cluster are never touched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mumic_core import synthetic
from pipelines import cluster, tables
from pipelines.retag.staging import RunStaging

ROOT = Path(__file__).resolve().parents[2]
MARKER = "MUMIC_TEST_REAP"  # in the killed driver's environment, so in every process its Ray started
N_IMAGES = 400  # enough that its workers are still staging when the first part lands (8 parts of 50)
TIMEOUT_S = 240

DRIVER = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
from pipelines.retag import run_retag

def on_event(name, info):
    if name == "staged":
        time.sleep(600)  # mid-run, with the cluster up: wait here to be killed

run_retag(cfg["catalog"], cfg["model"], cfg["output"], on_event=on_event, **cfg["options"])
"""


def _own_ray_env(**extra: str) -> dict:
    """No RAY_ADDRESS: the process starts a local Ray of its own, as `mumic retag` on a laptop does."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", MARKER)}
    return {**env, **extra}


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _marked(value: str) -> list[int]:
    """Live (not zombie) processes whose environment carries MARKER=value."""
    needle = f"{MARKER}={value}".encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and needle in _environ(int(name)).split(b"\0"):
            if cluster._alive(int(name)):
                out.append(int(name))
    return out


def _of_session(name: str) -> list[int]:
    """Live processes whose command line or open files name the Ray session `name` (Ray starts its agents
    with an environment of its own: the marker does not reach them)."""
    out = []
    for p in os.listdir("/proc"):
        pid = int(p) if p.isdigit() else 0
        if pid and pid != os.getpid() and cluster._alive(pid):
            if name in " ".join(cluster._argv(pid)) or name in cluster._open_sessions(pid):
                out.append(pid)
    return out


def _left_by(driver_pid: int, mark: str) -> list[int]:
    """Every live process the killed driver's run started: its session's (named after the driver's pid)
    and those that inherited its environment."""
    sessions = [p.name for p in Path("/tmp/ray").glob(f"session_*_{driver_pid}")]
    return sorted(set(_marked(mark)).union(*(_of_session(s) for s in sessions)) - {driver_pid})


def _kill_marked(value: str) -> None:
    """Safety net at the end: only the processes this test's driver started, by pid."""
    for pid in _marked(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("reap-catalog")
    rows = synthetic.write_dataset(folder, N_IMAGES, seed=51, size=64)
    pq.write_table(pa.Table.from_pylist([{"image_id": r["image_id"], "uri": r["uri"]} for r in rows]),
                   folder / "catalog.parquet")
    return folder / "catalog.parquet", rows


def test_find_orphans_never_lists_a_live_clusters_agents(ray_cluster):
    node_id = ray_cluster.get_runtime_context().get_node_id()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    (raylet,) = [p for p in pids if f"--node_id={node_id}" in cluster._argv(p) and "raylet" in cluster._argv(p)[0]]
    live_agents = [
        p for p in pids
        if (cluster._stat(p) or ("", 0))[1] == raylet and any(m in " ".join(cluster._argv(p)) for m in cluster.AGENT_MARKS)
    ]
    assert live_agents, "the session's cluster has agents to protect"
    orphans = {p.pid for p in cluster.find_orphans()}
    assert not orphans & set(live_agents)
    live_sessions, _ = cluster._live_sessions()
    assert all(not (p.sessions & live_sessions) for p in cluster.find_orphans())


@pytest.mark.slow
def test_a_killed_drivers_agents_are_reaped_by_the_resume_which_finishes_exactly_once(
    big_catalog, tiny_model_dir, tmp_path
):
    catalog_path, rows = big_catalog
    output, run_id, mark = tmp_path / "out", "killed-1", uuid.uuid4().hex
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    options = {"run_id": run_id, "progress": False, "rows_per_part": 50, "batch_size": 16, "concurrency": 1}
    cfg = {"catalog": str(catalog_path), "model": str(tiny_model_dir), "output": str(output), "options": options}
    t0 = time.monotonic()
    driver = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], cwd=ROOT,
                              env=_own_ray_env(**{MARKER: mark}), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        parts = Path(RunStaging(str(output), run_id).path("parts"))
        deadline = time.monotonic() + TIMEOUT_S
        while not (parts.exists() and any(parts.glob("*.json"))):
            assert driver.poll() is None, driver.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "no part was staged"
            time.sleep(0.02)
        started = _left_by(driver.pid, mark)
        driver.send_signal(signal.SIGKILL)  # the driver only, as the OOM killer or `kill -9` would
        driver.wait(timeout=30)
        t_kill = time.monotonic()

        def agent(pid: int) -> bool:
            return any(m in " ".join(cluster._argv(pid)) for m in cluster.AGENT_MARKS)

        def starting(pid: int) -> bool:  # a worker process that never connected (no `ray::` title yet)
            return "default_worker.py" in " ".join(cluster._argv(pid))

        # its raylet, GCS and connected workers notice and exit within seconds; the agents stay. A worker
        # that was still starting when its raylet went exits on its own ~25 s later (checked below, after
        # the resume, rather than waited for here)
        while any(not agent(p) and not starting(p) for p in _left_by(driver.pid, mark)) and time.monotonic() - t_kill < 90:
            time.sleep(0.25)
        still_starting = [p for p in _left_by(driver.pid, mark) if not agent(p)]
        assert all(starting(p) for p in still_starting), [" ".join(cluster._argv(p)) for p in still_starting]
        left = {p: cluster._rss(p) for p in _left_by(driver.pid, mark) if agent(p)}
        titles = {p: " ".join(cluster._argv(p)) for p in left}
        orphans = {o.pid: o for o in cluster.find_orphans()}
        print(f"\nkilled the driver {t_kill - t0:.1f}s after its start; its run had {len(started)} processes; "
              f"{time.monotonic() - t_kill:.1f}s later {len(left)} agents are left ({sum(left.values()) / 2**20:.0f} MB), "
              f"and {len(still_starting)} workers that were starting: "
              + ", ".join(f"{titles[p][:24]} {left[p] >> 20} MB" for p in sorted(left)))
        assert left, "nothing outlived the driver: nothing to reap"
        assert all(agent(p) for p in left), titles
        assert set(left) <= set(orphans), (left, orphans)

        t1 = time.monotonic()
        resume = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "retag", "--catalog", str(catalog_path), "--model",
             str(tiny_model_dir), "--output", str(output), "--run-id", run_id, "--rows-per-part", "50",
             "--batch-size", "16", "--json"],
            cwd=ROOT, env=_own_ray_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
        )
        resume_s = time.monotonic() - t1
        assert resume.returncode == 0, resume.stderr[-4000:]
        reaped = [ln for ln in resume.stderr.splitlines() if "orphaned Ray agent" in ln]
        assert len(reaped) == 1 and reaped[0].startswith(f"mumic ray: reaped {len(left)} orphaned Ray agent"), (
            resume.stderr[-3000:]
        )
        assert "took over the lease of host" in resume.stderr and "that process is gone" in resume.stderr
        after = [p for p in left if cluster._alive(p)] + _left_by(driver.pid, mark)
        while after and time.monotonic() - t_kill < 90:  # the starting workers' own exit (see above)
            time.sleep(0.25)
            after = [p for p in left if cluster._alive(p)] + _left_by(driver.pid, mark)
        print(f"resume: {reaped[0]!r}; {resume_s:.1f}s; left of the killed run afterwards: {len(after)} "
              f"({sum(cluster._rss(p) for p in after) / 2**20:.0f} MB)")
        assert after == []

        summary = json.loads(resume.stdout)
        assert summary["status"] == "committed" and summary["rows_resumed"] >= 50
        assert summary["rows_resumed"] + summary["rows_processed"] == N_IMAGES
        tags = tables.open_table(str(output / "tags")).to_pyarrow_table(columns=["image_id", "run_id"])
        ids = tags.filter(pc.equal(tags.column("run_id"), run_id)).column("image_id")
        assert len(ids) == N_IMAGES and pc.count_distinct(ids).as_py() == N_IMAGES  # none twice, none lost
        assert set(ids.to_pylist()) == {r["image_id"] for r in rows}
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        _kill_marked(mark)
        for pid in _left_by(driver.pid, mark):  # only what the killed run started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_local_cluster_gets_the_ray_train_settings_its_workers_see_and_a_users_own_value_wins(
    ray_cluster, monkeypatch
):
    from ray.train.v2._internal import constants

    # the names are the ones Ray Train reads (a rename in Ray would silently drop the setting)
    assert set(cluster.LOCAL_CLUSTER_ENV) == {
        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
        constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
    }

    @ray_cluster.remote(num_cpus=0)
    def seen() -> dict:
        return {name: os.environ.get(name) for name in cluster.LOCAL_CLUSTER_ENV}

    # the session's cluster was started the way `mumic` starts a local one
    assert ray_cluster.get(seen.remote()) == cluster.LOCAL_CLUSTER_ENV
    monkeypatch.setenv(constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR, "3")
    monkeypatch.delenv(constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR)
    cluster.local_cluster_env()
    assert os.environ[constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "3"
    assert os.environ[constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"
