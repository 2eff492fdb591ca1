"""Is object-store latency hidden? images/s against fetch concurrency with +50 ms per image GET (and 0 ms).
Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_fetch_latency.py [--images 1500] [--alone-images 1000] [--grid 1x4,2x32] [--json F]

A local S3 server (moto, its own process) holds N generated 256x256 JPEGs; two fault proxies
(tests/faults.py, each its own process) stand in front of it, one adding 50 ms to every image GET, one
adding nothing. (a) the fetch stage alone (`fetch.fetch_batch`, one process, no Ray) against threads per
task; (b) whole `run_retag` runs (mumic-tiny, `full`) on a local Ray cluster against fetch_concurrency x
fetch_threads, with and without the latency. See tests/benchmarks/RESULTS-fetch.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"), ("RAY_DEDUP_LOGS", "0"), ("TOKENIZERS_PARALLELISM", "false"),
                   ("RAY_worker_niceness", "0")):
    os.environ.setdefault(key, value)
os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
BUCKET, PREFIX = "latency", "imgs/"
THREADS = (4, 8, 16, 32, 64)
RAY_GRID = ((1, 16), (2, 16), (4, 16), (1, 32), (2, 32), (4, 32))  # (fetch_concurrency, fetch_threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout_s} s")


def proxy_main(upstream: str, delay_ms: float) -> None:
    """The proxy process: forwards to `upstream`, image GETs `delay_ms` later; runs until stdin closes."""
    from faults import FaultProxy, Rule

    with FaultProxy(upstream) as proxy:
        if delay_ms:
            proxy.set_rules([Rule("delay", method="GET", key=PREFIX, delay_s=delay_ms / 1000)])
        print(proxy.endpoint, flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def servers(delays: tuple[float, ...]):
    """moto in its own process (the benchmark's client threads must not share its interpreter lock), and
    one proxy process per added latency: {delay_ms: endpoint}, plus moto's own endpoint under None."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(port)
        upstream = f"http://127.0.0.1:{port}"
        endpoints: dict = {None: upstream}
        for delay in delays:
            proxy = subprocess.Popen([sys.executable, __file__, "--proxy", upstream, str(delay)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proxy)
            endpoints[delay] = proxy.stdout.readline().strip()
        yield endpoints
    finally:
        for proc in reversed(procs):
            if proc.stdin:
                proc.stdin.close()
            else:
                proc.terminate()
            proc.wait(10)


def upload(endpoint: str, work: Path, n: int) -> list[str]:
    """n generated 256x256 JPEGs (~10 KB each) under s3://latency/imgs/."""
    import boto3

    from mumic_core import synthetic

    rows = synthetic.write_dataset(work / "src", n, seed=11, size=256, quality=85)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    paths = [work / "src" / r["uri"] for r in rows]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), BUCKET, PREFIX + p.name), paths))
    size = sum(p.stat().st_size for p in paths) / n
    print(f"uploaded {n} images, {size / 1024:.1f} KiB each on average", flush=True)
    return [f"s3://{BUCKET}/{PREFIX}{p.name}" for p in paths]


def fetch_alone(endpoints: dict, uris: list[str], results: dict) -> None:
    """(a) one process, no Ray: `fetch_batch` over every uri, for each threads-per-task, each latency.
    Client CPU per GET bounds what one task can do whatever the threads: 1 / cpu_per_get."""
    import pyarrow as pa

    from pipelines.retag import fetch

    batch = pa.table({"image_id": [u.rsplit("/", 1)[1] for u in uris], "uri": uris})
    for delay, endpoint in endpoints.items():
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # the S3 client is cached per endpoint: a fresh one
        fetch.fetch_batch(batch.slice(0, 32), fetch.FetchOptions(threads=8))  # the client, the connections
        for threads in (16, 64) if delay is None else THREADS:  # moto direct: the server's ceiling
            t0, c0 = time.perf_counter(), time.process_time()
            out = fetch.fetch_batch(batch, fetch.FetchOptions(threads=threads))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            errors = out.num_rows - out.column("status").null_count
            where = "moto direct" if delay is None else f"+{delay:g} ms"
            row = {"images_per_s": round(len(uris) / wall), "bound_threads_over_latency": round(threads / (delay / 1000)) if delay else None,
                   "client_cpu_ms_per_get": round(1000 * cpu / len(uris), 2), "errors": errors}
            results[f"(a) {where}, {threads} threads"] = row
            print(f"(a) {where:>12}, {threads:2d} threads: {row}", flush=True)


def tiny_model(folder: Path) -> Path:
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.model import MuMIC

    torch.manual_seed(0)
    checkpoint.save(MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny"), folder)
    return folder


def start_ray(ray, attempts: int = 3) -> None:
    """A local cluster; on a loaded box its start can time out, so it is tried again."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
            return
        except Exception as e:  # Ray raises a bare Exception for "the node timed out during startup"
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            print(f"ray.init failed ({e}); again", flush=True)


def whole_runs(endpoints: dict, delays: tuple[float, ...], work: Path, grid, reference, results: dict) -> None:
    """(b) run_retag (full) from the s3:// prefix into a local output, one Ray cluster per latency (its
    workers take the endpoint from the environment at start)."""
    import ray

    from pipelines.retag import run_retag

    model = tiny_model(work / "tiny")
    for delay in delays:
        os.environ["AWS_ENDPOINT_URL"] = endpoints[delay]
        start_ray(ray)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for tasks, threads in grid if delay else reference:
            t0 = time.perf_counter()
            s = run_retag(f"s3://{BUCKET}/{PREFIX}", str(model), str(work / f"out-{delay:g}-{tasks}-{threads}"),
                          full=True, progress=False, fetch_concurrency=tasks, fetch_threads=threads)
            wall = time.perf_counter() - t0
            rest = s["pipeline_seconds"] - s["first_output_seconds"]
            # None: every row came out with the first batch (the fetch finished while the actors started)
            steady = round(s["rows_processed"] / rest) if rest > 1 else None
            row = {"wall_s": round(wall, 1), "pipeline_s": s["pipeline_seconds"], "startup_s": s["first_output_seconds"],
                   "images_per_s": s["images_per_s"], "after_startup_per_s": steady, "ok": s["rows_ok"],
                   "errors": s["rows_error"]}
            results[f"(b) +{delay:g} ms, {tasks} tasks x {threads} threads"] = row
            print(f"(b) +{delay:g} ms, {tasks} tasks x {threads:2d} threads: {row}", flush=True)
        ray.shutdown()


def main() -> None:
    if sys.argv[1:2] == ["--proxy"]:
        return proxy_main(sys.argv[2], float(sys.argv[3]))
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1500, help="images in the bucket: the catalog of (b)")
    p.add_argument("--alone-images", type=int, default=1000, help="images (a) reads per measurement")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--no-ray", action="store_true", help="(a) only")
    p.add_argument("--no-alone", action="store_true", help="(b) only")
    p.add_argument("--full-reference", action="store_true", help="(b) at 0 ms for the whole grid, not 2 points")
    p.add_argument("--grid", help="(b) at these TASKSxTHREADS only, both latencies (e.g. 1x4,1x16,2x32)")
    p.add_argument("--json", help="write the figures to this file too")
    a = p.parse_args()
    results: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 1), "latency_ms": a.latency_ms}
    delays = (a.latency_ms, 0.0)
    t_start = time.perf_counter()
    with servers(delays) as endpoints, tempfile.TemporaryDirectory(prefix="bench-latency-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        uris = upload(endpoints[None], work, a.images)
        if not a.no_alone:
            fetch_alone(endpoints, uris[: a.alone_images], results)
        if not a.no_ray:
            grid = tuple(tuple(map(int, g.split("x"))) for g in a.grid.split(",")) if a.grid else RAY_GRID
            reference = grid if a.full_reference or a.grid else ((2, 16), (4, 32))
            whole_runs(endpoints, delays, work, grid, reference, results)
    results["load_after"] = round(os.getloadavg()[0], 1)
    results["benchmark_s"] = round(time.perf_counter() - t_start)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
