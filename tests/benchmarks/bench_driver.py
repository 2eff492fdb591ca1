"""The retag driver's own cost: CPU-seconds (getrusage of the driver process, by phase) and peak RSS, per
million rows, for a retag of N generated images with mumic-tiny; beside it, what the old driver-writes
path cost the driver for the same rows (`PartWriter` on the driver: the rows it used to receive, staged by
it). Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_driver.py [--n 5000] [--rows-per-part 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("_start_or_resume", "_stage_rest", "_verify_and_commit", "_update_current")


def cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def timed_phases(run_mod, spent: dict) -> None:
    """Wrap the run's phases to add up the driver's CPU-seconds in each (_update_current nests in commit)."""
    for name in PHASES:
        fn = getattr(run_mod, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            c0, t0 = cpu_s(), time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_name] = spent.get(_name, 0.0) + cpu_s() - c0
                spent[_name + ".wall"] = spent.get(_name + ".wall", 0.0) + time.perf_counter() - t0

        setattr(run_mod, name, wrapped)


def old_driver_path(n: int, rows_per_part: int, dim: int, labels: int, work: Path) -> tuple[float, float]:
    """CPU-seconds the driver spent staging n output rows itself (the old path, before the transfer)."""
    import numpy as np
    import pyarrow as pa

    from pipelines import tables
    from pipelines.retag.staging import PartWriter, RunStaging

    writer = PartWriter(RunStaging(str(work / "old"), "old"), "2026-01-02",
                        {"model_name": "m", "model_version": "1", "taxonomy_sha256": "t", "run_id": "old"},
                        rows_per_part)
    rng = np.random.default_rng(0)

    def flat(k: int, d: int) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (k + 1) * d, d, dtype=np.int32)),
                                        pa.array(rng.random(k * d, np.float32)))

    c0, t0 = cpu_s(), time.perf_counter()
    for start in range(0, n, 256):
        k = min(256, n - start)
        writer.add(pa.table({
            "image_id": [f"img-{i:09d}" for i in range(start, start + k)],
            "uri": [f"/data/img-{i:09d}.jpg" for i in range(start, start + k)],
            "content_sha256": [f"{i:064x}" for i in range(start, start + k)],
            "status": ["ok"] * k, "error": pa.nulls(k, pa.string()),
            "labels": pa.nulls(k, tables.LABELS_TYPE), "scores": flat(k, labels).cast(tables.FLOATS_TYPE),
            "embedding": flat(k, dim).cast(tables.FLOATS_TYPE), "processed_at": pa.nulls(k, tables.UTC_TS),
        }))
    writer.flush()
    return cpu_s() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rows-per-part", type=int, default=1000)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.model import MuMIC
    from pipelines.retag import ids as ids_mod
    from pipelines.retag import run as run_mod

    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny")
        checkpoint.save(model, work / "model")
        rows = synthetic.write_dataset(work / "images", args.n, seed=5, size=64)
        catalog = work / "catalog.parquet"
        pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows],
                                 "uri": [str(work / "images" / r["uri"]) for r in rows]}), catalog)
        ids = pa.array([f"images/some/prefix/{i:09d}.jpg" for i in range(1_000_000)])
        t0 = time.perf_counter()
        ids_mod.fingerprint(ids)
        print(f"fingerprint of 1 M ids (BLAKE2b-64 sum): {time.perf_counter() - t0:.2f}s")

        spent: dict = {}
        timed_phases(run_mod, spent)
        c0 = cpu_s()
        summary = run_mod.run_retag(str(catalog), str(work / "model"), str(work / "out"), progress=False,
                                    rows_per_part=args.rows_per_part, batch_size=256)
        total = cpu_s() - c0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        per_m = 1e6 / args.n
        print(f"retag of {args.n} images (rows_per_part {args.rows_per_part}): {summary['seconds']:.1f}s wall, "
              f"{summary['images_per_s']} images/s; driver CPU {total:.2f}s = {total * per_m:.0f}s per M rows; "
              f"driver peak RSS {peak_mb:.0f} MB (includes torch + the model import)")
        for name in PHASES:
            print(f"  {name:20s} CPU {spent.get(name, 0):6.2f}s  wall {spent.get(name + '.wall', 0):6.2f}s  "
                  f"→ {spent.get(name, 0) * per_m:7.0f} CPU-s per M rows")
        dim, labels = model.embed_dim, len(model.taxonomy)
        old_cpu, old_wall = old_driver_path(args.n, args.rows_per_part, 512, labels, work)
        print(f"old path, driver staging alone ({args.n} rows, 512-d embeddings, {labels} scores; tiny's own "
              f"embedding is {dim}-d): CPU {old_cpu:.2f}s = {old_cpu * per_m:.0f}s per M rows "
              f"({args.n / old_wall:.0f} rows/s), before the rows' transfer to the driver")


if __name__ == "__main__":
    main()
