"""Skip and resume state at catalog scale: a simulated 10 M-row history, and what a night's skip checks
and a resume cost in time and memory. Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_skip_state.py [--rows 10000000] [--changed 0.01] [--staged 0.5]

Builds (real Delta tables and Parquet, only the columns the checks read): `current` with `rows` ok rows
(image_id, uri, size, etag, labels, model, taxonomy), `tags` with `rows` ok content hashes, a catalog
snapshot of `rows` listed objects of which `changed` have a new ETag, and a run staged up to `staged`.
Then measures, each step's peak RSS above the process's before it (a sampler thread, every 50 ms):
  1. the unchanged index from `current` (`unchanged.KnownObjects`, what a night builds first);
  2. the split of the snapshot through it (unchanged rows staged as skipped parts, the rest written);
  3. the content-hash set from `tags` (`decode.KnownDigests`, built only when something is left to read);
  4. a resume: the staged ids read back, and the snapshot without them — one anti-join now, against the
     per-batch `pc.is_in` of before (timed on a few batches, extrapolated);
  5. the exactly-once check's count of distinct staged ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deltalake import CommitProperties, DeltaTable  # noqa: E402
from deltalake.transaction import AddAction  # noqa: E402

from pipelines.retag import catalog, unchanged  # noqa: E402
from pipelines.retag.decode import KnownDigests  # noqa: E402
from pipelines.retag.staging import PartWriter, RunStaging  # noqa: E402
from pipelines.tables import LABELS_TYPE, UTC_TS  # noqa: E402
from pipelines.tables.queries import iter_known_objects, iter_ok_hashes  # noqa: E402

CHUNK = 1_000_000  # rows generated, and written as one Parquet file, at a time
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Step:
    """Wall time and peak RSS above the starting RSS of a `with` block."""

    def __init__(self, name: str, results: dict):
        self.name, self.results = name, results

    def __enter__(self):
        self.base, self.peak, self.stop = rss(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.results[self.name] = {"seconds": round(seconds, 2), "peak_mib_above": round((self.peak - self.base) / 2**20)}
        print(f"{self.name:<55} {seconds:8.1f} s   peak +{(self.peak - self.base) / 2**20:8,.0f} MiB", flush=True)


def strings(prefix: str, start: int, n: int, suffix: str = "") -> pa.Array:
    numbers = pc.utf8_lpad(pc.cast(pa.array(np.arange(start, start + n)), pa.string()), 9, "0")
    return pc.binary_join_element_wise(prefix, numbers, suffix, "")


def hex_digests(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    chars = np.stack([HEX[raw >> 4], HEX[raw & 15]], axis=2).reshape(-1)
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 64).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(chars.tobytes())])


def objects(start: int, n: int, changed: np.ndarray | None = None) -> dict[str, pa.Array]:
    """Listed objects start..start+n: ids, s3 uris, sizes and ETags (a new ETag where `changed`)."""
    etag = pc.utf8_lpad(pc.cast(pa.array(np.arange(start, start + n)), pa.string()), 32, "e")
    if changed is not None:
        etag = pc.if_else(pa.array(changed), pc.binary_join_element_wise(etag, "x", ""), etag)
    return {
        "image_id": strings("catalog/part-", start, n, ".jpg"),
        "uri": strings("s3://images-bucket/catalog/part-", start, n, ".jpg"),
        "size": pa.array(20_000 + np.arange(start, start + n) % 5_000, pa.int64()),
        "etag": etag,
        "mtime": pa.nulls(n, UTC_TS),
    }


def delta_table(path: Path, chunks) -> None:
    """A Delta table of the given tables, one Parquet file each, committed in one transaction."""
    actions, schema = [], None
    path.mkdir(parents=True)
    for i, table in enumerate(chunks):
        schema = table.schema
        name = f"part-{i:05d}.parquet"
        pq.write_table(table, path / name, compression="zstd")
        actions.append(AddAction(name, (path / name).stat().st_size, {}, int(time.time() * 1000), True,
                                 json.dumps({"numRecords": table.num_rows})))
    table = DeltaTable.create(str(path), schema)
    table.create_write_transaction(actions, mode="append", schema=table.schema(), partition_by=[],
                                   commit_properties=CommitProperties())


def build(work: Path, rows: int, changed: float) -> tuple[list[str], int]:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    labels = pa.array([[{"label": "a", "score": 0.9}]], LABELS_TYPE)

    def current_chunks():
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            cols = objects(start, n)
            cols |= {
                "status": pa.array(["ok"] * n),
                "labels": labels.take(pa.array(np.zeros(n, np.int64))),
                "model_name": pa.array(["m"] * n),
                "model_version": pa.array(["1"] * n),
                "taxonomy_sha256": pa.array(["t" * 64] * n),
            }
            yield pa.table(cols)

    def tags_chunks():
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            yield pa.table({"content_sha256": hex_digests(rng, n), "status": pa.array(["ok"] * n),
                            "model_name": pa.array(["m"] * n), "model_version": pa.array(["1"] * n)})

    delta_table(work / "out" / "current", current_chunks())
    delta_table(work / "out" / "tags", tags_chunks())
    is_changed = rng.random(rows) < changed
    snapshot = catalog.write_snapshot(
        (pa.record_batch(objects(s, min(CHUNK, rows - s), is_changed[s : s + CHUNK]), schema=catalog.CATALOG_SCHEMA)
         for s in range(0, rows, CHUNK)),
        str(work / "snapshot"),
        check_duplicates=False,
    )
    print(f"built: current {rows:,} rows, tags {rows:,} hashes, snapshot {snapshot.num_rows:,} rows "
          f"({int(is_changed.sum()):,} changed) in {time.perf_counter() - t0:.0f} s", flush=True)
    return list(snapshot.files), int(is_changed.sum())


def measure(work: Path, files: list[str], rows: int, staged_share: float, results: dict) -> None:
    with Step("1. unchanged index from current (KnownObjects)", results):
        known = unchanged.KnownObjects.from_batches(iter_known_objects(str(work / "out" / "current"), "m", "1", "t" * 64))
    results["index_bytes"] = known.nbytes
    print(f"   {len(known):,} rows indexed, {known.nbytes / 2**20:,.0f} MiB of fingerprints", flush=True)

    staging = RunStaging(str(work / "out"), "night")
    writer = PartWriter(staging, "2026-12-01", {"model_name": "m", "model_version": "1",
                                                "taxonomy_sha256": "t" * 64, "run_id": "night"}, 100_000)
    with Step("2. split: unchanged rows staged unread, the rest written", results):
        todo = catalog.write_snapshot(unchanged.split(catalog.read_snapshot(files), known, writer.add),
                                      staging.path("todo"), check_duplicates=False, schema=unchanged.TODO_SCHEMA)
        writer.flush()
    results["todo_rows"] = todo.num_rows
    print(f"   {rows - todo.num_rows:,} unchanged in {len(writer.parts)} parts, {todo.num_rows:,} left to read", flush=True)
    del known

    with Step("3. content-hash set from tags (KnownDigests)", results):
        digests = KnownDigests.from_hex(iter_ok_hashes(str(work / "out" / "tags"), "m", "1"))
    print(f"   {len(digests):,} digests, {digests.digests.nbytes / 2**20:,.0f} MiB", flush=True)
    del digests

    parts = staging.parts()
    keep = parts[: max(1, int(len(parts) * staged_share))]
    with Step(f"4a. resume: staged ids of {sum(p.rows for p in keep):,} rows read back", results):
        ids = staging.staged_ids(keep)
    with Step("4b. resume: the snapshot without them, one anti-join (now)", results):
        left = sum(b.num_rows for b in catalog.without_ids(catalog.read_snapshot(files), ids))
    print(f"   {left:,} rows left", flush=True)
    batches, t0 = catalog.read_snapshot(files), time.perf_counter()
    done = 0
    for batch in batches:  # before: one is_in per 64 Ki-row batch, rebuilding the set each time
        pc.invert(pc.is_in(batch.column("image_id"), value_set=ids))
        done += 1
        if done == 3:
            break
    per_batch = (time.perf_counter() - t0) / done
    before = per_batch * -(-rows // catalog.BATCH_ROWS)
    results["resume_before_extrapolated_s"] = round(before)
    print(f"4c. resume before: per-batch is_in, {per_batch:.2f} s a batch → {before:,.0f} s for {rows:,} rows "
          "(extrapolated from 3 batches)", flush=True)
    with Step("5. exactly-once check: distinct staged ids (all parts)", results):
        distinct = pc.count_distinct(staging.staged_ids(parts)).as_py()
    print(f"   {distinct:,} distinct of {sum(p.rows for p in parts):,} staged", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--staged", type=float, default=0.5, help="share of the run's parts staged before the crash")
    p.add_argument("--json", help="write the figures to this file too")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-skip-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        files, _ = build(work, a.rows, a.changed)
        results: dict = {"rows": a.rows, "changed": a.changed, "cpus": os.cpu_count(), "load": os.getloadavg()[0]}
        measure(work, files, a.rows, a.staged, results)
        print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
