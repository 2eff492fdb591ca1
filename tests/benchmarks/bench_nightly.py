"""A nightly retag whose cost follows what changed: night 1 tags every image, night 2 finds 1 % changed.
Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_nightly.py [--images 100000] [--s3-images 2000] [--changed 0.01]

Night 2 (and night 3, nothing changed since night 2) runs twice from copies of the same night-1 output: "before" with `skip_unchanged=False` (today's
behaviour until this change: every image downloaded and hashed, unchanged ones then skipped by their
content hash) and "after" (the default: unchanged size and ETag / mtime against `current`, skipped before
any GET). Two catalogs: a local folder of tiny JPEGs (listing: size + mtime), and an s3:// prefix on a
local S3 server (moto) behind the fault proxy of tests/faults.py, which counts every GET and HEAD the run's
processes send (listing: size + ETag). Objects fetched = image GETs (S3) or rows the pipeline read (local).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_DEDUP_LOGS", "0"), ("TOKENIZERS_PARALLELISM", "false"),
                   ("RAY_worker_niceness", "0")):
    os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> Path:
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.model import MuMIC

    torch.manual_seed(0)
    checkpoint.save(MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny"), folder)
    return folder


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    """n tiny JPEGs (32x32, ~1 KB: the pipeline's overheads, not the decode, dominate)."""
    from mumic_core import synthetic

    return [folder / r["uri"] for r in synthetic.write_dataset(folder, n, seed=seed, size=32, quality=80)]


def change(paths: list[Path], share: float, seed: int) -> list[Path]:
    """Rewrite `share` of the files with other image bytes (a new size, or at least a new mtime)."""
    import numpy as np

    from mumic_core import synthetic

    rng = np.random.default_rng(seed)
    picked = [paths[i] for i in sorted(rng.choice(len(paths), max(1, int(len(paths) * share)), replace=False))]
    for i, path in enumerate(picked):
        img, _ = synthetic.make_image(np.random.default_rng(seed * 1_000_003 + i), 32, False)
        img.save(path, quality=80)
        os.utime(path, ns=(time.time_ns(),) * 2)
    return picked


def retag(catalog: str, model: Path, output: str, run_id: str, **kw) -> tuple[dict, float]:
    from pipelines.retag import run_retag

    t0 = time.perf_counter()
    summary = run_retag(catalog, str(model), output, run_id=run_id, progress=False, **kw)
    return summary, time.perf_counter() - t0


def night1(catalog: str, model: Path, out1: str, count, label: str, results: dict) -> dict:
    """Night 1: every image new."""
    one, wall = retag(catalog, model, out1, "n1")
    results[f"{label} night 1"] = {"wall_s": round(wall, 1), "fetched": count(one), "ok": one["rows_ok"]}
    print(f"{label}: night 1 {wall:.1f} s, {one['rows_ok']} ok", flush=True)
    return one


def night2(catalog: str, model: Path, out: str, count, label: str, results: dict, skip: bool, run_id: str = "n2") -> None:
    summary, wall = retag(catalog, model, out, run_id, skip_unchanged=skip)
    row = {
        "wall_s": round(wall, 1),
        "pipeline_s": summary.get("pipeline_seconds", 0.0),
        "fetched": count(summary),
        "processed": summary["rows_processed"],
        "not_fetched": summary["rows_not_fetched"],
        "skipped": summary["rows_skipped"],
        "ok": summary["rows_ok"],
    }
    results[label] = row
    print(f"{label}: {row}", flush=True)


def local_nights(work: Path, model: Path, n: int, share: float, results: dict) -> None:
    folder = work / "local"
    t0 = time.perf_counter()
    paths = write_images(folder, n, seed=1)
    print(f"local: {n} images written in {time.perf_counter() - t0:.0f} s", flush=True)

    def fetched(summary: dict) -> int:
        return summary["rows_processed"]  # a listing: every row the pipeline gets is read (no HEAD path)

    night1(str(folder), model, str(work / "out-local"), fetched, f"local {n}", results)
    changed = change(paths, share, seed=2)
    for skip, what in ((False, "before"), (True, "after")):
        out = work / f"out-local-{what}"
        shutil.copytree(work / "out-local", out)
        night2(str(folder), model, str(out), fetched, f"local {n} night 2 ({len(changed)} changed) {what}", results, skip)
        # night 3: nothing changed since night 2
        night2(str(folder), model, str(out), fetched, f"local {n} night 3 (nothing changed) {what}", results, skip, "n3")
        shutil.rmtree(out)


def s3_nights(work: Path, model: Path, proxy, endpoint: str, n: int, share: float, results: dict) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="nightly")
    paths = write_images(work / "s3src", n, seed=3)
    for p in paths:
        client.upload_file(str(p), "nightly", f"imgs/{p.name}")
    keys = [f"imgs/{p.name}" for p in paths]

    def gets(_summary: dict) -> int:
        return sum(proxy.count(k, "GET") for k in keys)

    def counted(fn):
        def run(*a, **k):
            proxy.clear()
            return fn(*a, **k)

        return run

    counted(night1)("s3://nightly/imgs", model, "s3://nightly/out", gets, f"s3 {n}", results)
    changed = change(paths, share, seed=4)
    for p in changed:
        client.upload_file(str(p), "nightly", f"imgs/{p.name}")
    for skip, what in ((False, "before"), (True, "after")):
        out = f"s3://nightly/out-{what}"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="nightly", Prefix="out/"):
            for obj in page.get("Contents", ()):
                client.copy_object(Bucket="nightly", Key=f"out-{what}/" + obj["Key"][4:],
                                   CopySource={"Bucket": "nightly", "Key": obj["Key"]})
        counted(night2)("s3://nightly/imgs", model, out, gets, f"s3 {n} night 2 ({len(changed)} changed) {what}",
                        results, skip)
        results[f"s3 {n} night 2 ({len(changed)} changed) {what}"]["heads"] = sum(proxy.count(k, "HEAD") for k in keys)


def head_vs_get(endpoint: str, work: Path, results: dict, n: int = 400, threads: int = 16) -> None:
    """What a metadata request saves against a download, for small and larger images: HEAD vs GET on the
    S3 server (requests/s, `threads` in flight), and a local stat vs a read + SHA-256 (files/s)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="headget")
    folder = work / "headget"
    folder.mkdir()
    for kib in (1, 30, 300):
        body = os.urandom(kib << 10)
        keys = [f"{kib}/{i}.jpg" for i in range(n)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda k, body=body: client.put_object(Bucket="headget", Key=k, Body=body), keys))
        for name, call in (("HEAD", lambda k: client.head_object(Bucket="headget", Key=k)),
                           ("GET", lambda k: hashlib.sha256(client.get_object(Bucket="headget", Key=k)["Body"].read()))):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(call, keys))
            results[f"s3 {name} {kib} KiB per s"] = round(n / (time.perf_counter() - t0))
        files = [folder / f"{kib}-{i}.jpg" for i in range(n)]
        for f in files:
            f.write_bytes(body)
        for name, call in (("stat", os.stat), ("read+sha256", lambda f: hashlib.sha256(f.read_bytes()))):
            t0 = time.perf_counter()
            for f in files:
                call(f)
            results[f"local {name} {kib} KiB per s"] = round(n / (time.perf_counter() - t0))
        print({k: v for k, v in results.items() if f" {kib} KiB" in k}, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100_000, help="local folder catalog size (0: skip)")
    p.add_argument("--s3-images", type=int, default=2_000, help="s3:// catalog size (0: skip)")
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--json", help="write the figures to this file too")
    a = p.parse_args()
    from faults import FaultProxy
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    results: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 1)}
    with FaultProxy(endpoint) as proxy, tempfile.TemporaryDirectory(prefix="bench-nightly-", dir=os.environ.get("BENCH_DIR")) as tmp:
        # set before Ray starts: every worker sends its S3 requests through the proxy
        os.environ.update({"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        work = Path(tmp)
        model = tiny_model(work / "tiny")
        head_vs_get(endpoint, work, results)
        if a.images:
            local_nights(work, model, a.images, a.changed, results)
        if a.s3_images:
            s3_nights(work, model, proxy, endpoint, a.s3_images, a.changed, results)
        ray.shutdown()
    moto.stop()
    results["load_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
