"""Which device a retag's inference actors use: told by the plan, never guessed; a GPU that was reserved
but cannot be used, or GPUs that never arrive, fail the run in one line instead of running on a CPU
thread or waiting forever."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mumic_core import synthetic
from pipelines.retag import RetagError, RetagOptions, plan_resources, run_retag

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_actors_are_told_cpu_and_gpu_actors_cuda():
    cpu = plan_resources({"CPU": 16.0}, RetagOptions())
    gpu = plan_resources({"CPU": 16.0, "GPU": 2.0}, RetagOptions())
    assert (cpu.device, cpu.precision, cpu.actor_gpus) == ("cpu", "fp32", 0.0)
    assert (gpu.device, gpu.precision, gpu.actor_gpus) == ("cuda", "bf16", 1.0)


def test_a_gpu_actor_runs_torch_on_one_thread_and_leaves_the_cores_to_decode():
    plan = plan_resources({"CPU": 8.0, "GPU": 1.0}, RetagOptions())
    assert (plan.actors, plan.actor_cpus, plan.torch_threads) == (1, 1.0, 1)


def test_fetch_concurrency_on_gpus_keeps_enough_reads_in_flight():
    # one GPU at ~3 000 images/s with 50 ms GETs needs ~150 reads in flight (the defaults: 8 tasks x 32
    # threads), and at ~500 GETs/s a task at most (its client's CPU), at least 6 tasks
    plan = plan_resources({"CPU": 8.0, "GPU": 1.0}, RetagOptions())
    assert plan.fetch_tasks * RetagOptions().fetch_threads >= 150
    assert plan.fetch_tasks >= 6
    assert plan_resources({"CPU": 2.0}, RetagOptions()).fetch_tasks == 2
    assert plan_resources({"CPU": 8.0, "GPU": 1.0}, RetagOptions(fetch_concurrency=3)).fetch_tasks == 3


def test_int8_on_a_gpu_plan_is_refused_before_anything_starts():
    from mumic_core.model import ModelError

    with pytest.raises(ModelError, match="int8"):
        plan_resources({"CPU": 8.0, "GPU": 1.0}, RetagOptions(precision="int8"))
    assert plan_resources({"CPU": 2.0}, RetagOptions(precision="int8")).precision == "int8"


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalog-devices")
    synthetic.write_dataset(folder, 6, seed=3)
    return folder


def test_gpus_asked_for_that_never_arrive_fail_after_gpu_wait_s(ray_cluster, small_catalog, tiny_model_dir, tmp_path):
    with pytest.raises(RetagError) as info:
        run_retag(str(small_catalog), str(tiny_model_dir), str(tmp_path / "out"), gpus=1, gpu_wait_s=2, progress=False)
    message = str(info.value)
    assert "--gpu-wait-s 2" in message and "\n" not in message
    assert not (tmp_path / "out" / "tags").exists(), "nothing committed"


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import ray
    from pipelines.retag import RetagError, run_retag

    # a logical GPU that torch cannot use: what a node with a too-old driver (or a GPU Ray was told of
    # but the container cannot see) looks like to the actor that reserved it
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        run_retag(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
        print("NO ERROR", flush=True)
    except RetagError as e:
        print("RETAG ERROR:", e, flush=True)
    ray.shutdown()
    """
)


def test_a_gpu_actor_whose_torch_cannot_use_cuda_fails_the_run_in_one_line(small_catalog, tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(small_catalog), str(tiny_model_dir), str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("RETAG ERROR:", "NO ERROR"))]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    assert lines[0].startswith("RETAG ERROR: an inference actor failed to start: a GPU was asked for")
    assert "not falling back to the CPU" in lines[0]
    assert not (tmp_path / "out" / "tags").exists(), "nothing committed"
