"""The cost of the nightly `current` update at catalog scale: 1 M images in `current`, a night on which
1 % changed (10 000 re-tagged rows) and 99 % were skipped as unchanged.

Prints wall time, rows/s, peak RSS of this process and the bytes the update read and wrote, beside the
cost of only reading `current` once (the floor of any copy-on-write update). Not part of the test run:

    python tests/benchmarks/bench_current.py [--rows 1000000] [--changed 0.01] [--dim 512] [--labels 120]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deltalake import CommitProperties  # noqa: E402

from pipelines.retag.commit import commit_run  # noqa: E402
from pipelines.retag.current import (  # noqa: E402
    ROWS_PER_FILE,
    RunFacts,
    _write_files,  # noqa: E402
    update_current,
)
from pipelines.retag.staging import PartWriter, RunStaging  # noqa: E402
from pipelines.tables import CURRENT_SCHEMA, FLOATS_TYPE, LABELS_TYPE, TAGS_SCHEMA, UTC_TS, open_or_create  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def rows(start: int, n: int, dim: int, labels: int, rng, run_id: str, version: int) -> pa.Table:
    """n synthetic tagged rows: ids start..start+n, a 512-d unit embedding, scores, the top-5 labels."""
    ids = [f"img-{i:08d}" for i in range(start, start + n)]
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = rng.random((n, labels), dtype=np.float32)
    top = pa.StructArray.from_arrays(
        [pa.array(np.repeat([f"label-{k}" for k in range(5)], 1)[np.tile(np.arange(5), n)]), pa.array(scores[:, :5].reshape(-1))],
        names=["label", "score"],
    )
    now = dt.datetime.now(dt.UTC)
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"s3://catalog/{i}.jpg" for i in ids],
            "content_sha256": [f"{i:064x}" for i in range(start, start + n)],
            "status": pa.array(["ok"] * n),
            "error": pa.nulls(n, pa.string()),
            "labels": pa.ListArray.from_arrays(pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32)), top).cast(LABELS_TYPE),
            "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), labels).cast(FLOATS_TYPE),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim).cast(FLOATS_TYPE),
            "model_name": pa.array(["m"] * n),
            "model_version": pa.array(["1"] * n),
            "taxonomy_sha256": pa.array(["t" * 64] * n),
            "run_id": pa.array([run_id] * n),
            "run_date": pa.array(["2026-11-30"] * n),
            "processed_at": pa.array([now] * n, UTC_TS),
            "tags_version": pa.array([version] * n, pa.int64()),
            "last_seen_run_id": pa.array([run_id] * n),
            "last_seen_at": pa.array([now] * n, UTC_TS),
        }
    )


def build(out: Path, n: int, changed: int, dim: int, labels: int) -> tuple[list, float]:
    """`current` with n rows from night 1; night 2 staged: `changed` re-tagged rows + the rest skipped."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    current = open_or_create(str(out / "current"), CURRENT_SCHEMA)
    batches = (rows(s, min(ROWS_PER_FILE, n - s), dim, labels, rng, "n1", 1).to_batches()[0] for s in range(0, n, ROWS_PER_FILE))
    actions = _write_files(str(out / "current"), "n1", 0, batches)
    current.create_write_transaction(actions, mode="overwrite", schema=current.schema(), partition_by=[],
                                     commit_properties=CommitProperties())
    build_s = time.perf_counter() - t0
    staging = RunStaging(str(out), "n2")
    writer = PartWriter(staging, "2026-12-01", {"model_name": "m", "model_version": "1",
                                                "taxonomy_sha256": "t" * 64, "run_id": "n2"}, 100_000)
    changed_ids = set(rng.choice(n, changed, replace=False).tolist())
    for s in range(0, n, ROWS_PER_FILE):
        chunk = rows(s, min(ROWS_PER_FILE, n - s), dim, labels, rng, "n2", 2)
        is_changed = np.array([s + i in changed_ids for i in range(chunk.num_rows)])
        status = np.where(is_changed, "ok", "skipped")
        chunk = chunk.set_column(chunk.schema.get_field_index("status"), "status", pa.array(status))
        writer.add(chunk.select([c for c in TAGS_SCHEMA.names if c in chunk.column_names and c != "run_date"]))
    writer.flush()
    parts = staging.parts()
    run_row = {"run_id": "n2", "run_date": "2026-12-01", "started_at": dt.datetime.now(dt.UTC).isoformat(),
               "finished_at": dt.datetime.now(dt.UTC).isoformat(), "model_name": "m", "model_version": "1",
               "taxonomy": "[]", "catalog": "bench", "rows_ok": changed, "rows_error": 0, "rows_skipped": n - changed}
    version = commit_run(str(out / "tags"), "n2", "2026-12-01", parts, run_row)
    return parts, build_s, version


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--labels", type=int, default=120)
    a = p.parse_args()
    changed = int(a.rows * a.changed)
    with tempfile.TemporaryDirectory(prefix="bench-current-", dir=os.environ.get("BENCH_DIR")) as tmp:
        out = Path(tmp)
        parts, build_s, version = build(out, a.rows, changed, a.dim, a.labels)
        size = folder_bytes(out / "current")
        print(f"built current: {a.rows} rows, {size / 2**30:.2f} GiB of Parquet in {build_s:.0f} s")
        t0 = time.perf_counter()
        read_rows = sum(b.num_rows for b in __import__("pipelines.tables", fromlist=["open_table"]).open_table(
            str(out / "current")).to_pyarrow_dataset().to_batches())
        read_s = time.perf_counter() - t0
        rss0 = rss_mib()
        t0 = time.perf_counter()
        counts = update_current(str(out), RunFacts("n2", "2026-12-01", version, "m", "1", dt.datetime.now(dt.UTC)), parts)
        update_s = time.perf_counter() - t0
        written = folder_bytes(out / "current") - size
        print(f"read current once:     {read_rows} rows in {read_s:.1f} s ({read_rows / read_s:,.0f} rows/s)")
        print(f"update ({a.changed:.0%} changed): {update_s:.1f} s ({a.rows / update_s:,.0f} rows/s), "
              f"{counts}, wrote {written / 2**30:.2f} GiB, ratio to one read {update_s / read_s:.2f}")
        print(f"peak RSS of this process: {rss_mib():,.0f} MiB (before the update: {rss0:,.0f} MiB)")


if __name__ == "__main__":
    main()
