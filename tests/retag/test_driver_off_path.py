"""The retag driver off the data path: the workers stage the parts and the driver sees only their records;
exactly-once checked by id fingerprints in O(parts); the precision the actors ran, recorded per run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mumic_core import synthetic
from pipelines import tables
from pipelines.retag import RetagError, StagingMismatch, run_retag
from pipelines.retag import ids as ids_mod
from pipelines.retag import run as retag_run
from pipelines.retag.commit import ensure_run_row
from pipelines.retag.staging import PART_FIELDS, PART_SCHEMA, PartWriter, RunStaging, write_parts

N = 20
CONSTANTS = {"model_name": "m", "model_version": "1", "taxonomy_sha256": "t", "run_id": "r"}


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("off-path")
    rows = synthetic.write_dataset(folder, N, seed=71)
    path = folder / "catalog.parquet"
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), path)
    return path, rows


def retag(catalog: Path, model: Path, output: Path, **kw) -> dict:
    return run_retag(str(catalog), str(model), str(output), progress=False, **kw)


def output_rows(n: int, offset: int = 0) -> pa.Table:
    """Rows as the Predictor hands them on (ok, with an embedding)."""
    ids = [f"i{k}" for k in range(offset, offset + n)]
    emb = pa.array([[0.1] * 8 for _ in ids], tables.FLOATS_TYPE)
    return pa.table({
        "image_id": ids,
        "uri": [f"/x/{i}.jpg" for i in ids],
        "content_sha256": [f"{k:064x}" for k in range(offset, offset + n)],
        "status": ["ok"] * n,
        "error": pa.nulls(n, pa.string()),
        "labels": pa.nulls(n, tables.LABELS_TYPE),
        "scores": pa.nulls(n, tables.FLOATS_TYPE),
        "embedding": emb,
        "processed_at": pa.nulls(n, tables.UTC_TS),
    })


def test_the_workers_stage_the_parts_and_the_driver_sees_only_their_records(
    catalog, tiny_model_dir, ray_cluster, tmp_path, monkeypatch
):
    seen: list[pa.Table] = []
    iter_batches = ray.data.Dataset.iter_batches

    def watched(self, *a, **kw):  # every batch the driver process receives from the pipeline
        for batch in iter_batches(self, *a, **kw):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", watched)
    path, rows = catalog
    out = tmp_path / "out"
    summary = retag(path, tiny_model_dir, out, run_id="off", rows_per_part=6, batch_size=4, concurrency=1)
    assert summary["status"] == "committed" and summary["rows_ok"] == N
    assert seen and all(tuple(b.schema.names) == PART_FIELDS for b in seen)  # records, never an embedding
    assert sum(b.num_rows for b in seen) == 4  # one row per part: 6 + 6 + 6 + 2
    assert summary["first_output_seconds"] > 0  # told by the inference actor, not by a row
    # the start-up's steps, in order (one actor: its model loads before its first batch)
    assert 0 < summary["actors_ready_seconds"] <= summary["first_output_seconds"] <= summary["pipeline_seconds"]
    assert 0 <= summary["ray_start_seconds"] < 1.0  # the session's cluster was already up: joined, not started
    tags = tables.open_table(str(out / "tags")).to_pyarrow_table()
    assert sorted(tags.column("image_id").to_pylist()) == sorted(r["image_id"] for r in rows)
    (row,) = tables.open_table(str(out / "runs")).to_pyarrow_table().to_pylist()
    assert row["precision"] == "fp32"  # auto on a CPU


def test_a_retried_write_task_overwrites_its_own_part(tmp_path):
    """Ray runs a task again when its worker died: the same rows get the same seq, so the same files."""
    staging = RunStaging(str(tmp_path / "out"), "r")
    kw = {"staging": staging, "run_date": "2026-01-02", "constants": CONSTANTS, "rows_per_part": 5,
          "max_part_bytes": 1 << 30, "seq_base": 7}
    first = write_parts(output_rows(8), **kw)
    again = write_parts(output_rows(8), **kw)
    other = write_parts(output_rows(3, offset=8), **kw)
    assert first.schema == PART_SCHEMA and again.column("seq").to_pylist() == first.column("seq").to_pylist()
    seqs = [*first.column("seq").to_pylist(), *other.column("seq").to_pylist()]
    assert len(set(seqs)) == 3 and all(s > 7 for s in seqs)  # above the base: after what was staged before
    parts = staging.parts()
    assert sorted(p.seq for p in parts) == sorted(seqs) and sum(p.rows for p in parts) == 11
    assert sorted(staging.staged_ids(parts).to_pylist()) == sorted(f"i{k}" for k in range(11))


def _staged(tmp_path: Path, n: int = 12) -> tuple[SimpleNamespace, dict]:
    staging = RunStaging(str(tmp_path / "out"), "fp")
    writer = PartWriter(staging, "2026-01-02", CONSTANTS, rows_per_part=5)
    writer.add(output_rows(n))
    writer.flush()
    run = SimpleNamespace(run_id="fp", staging=staging, output=staging.output)
    ids = pa.array([f"i{k}" for k in range(n)])
    return run, {"catalog_rows": n, "catalog_fingerprint": ids_mod.fingerprint(ids)}


def test_exactly_once_by_fingerprint_reads_no_staged_file(tmp_path):
    run, manifest = _staged(tmp_path)
    parts = run.staging.parts()
    for p in parts:  # the fingerprints decide: no staged id is read
        Path(run.staging.tags_uri, p.data_file).unlink()
    retag_run._check_exactly_once(run, manifest, parts, sum(p.rows for p in parts))


def test_fingerprints_catch_a_planted_duplicate_and_a_planted_missing_row(tmp_path):
    run, manifest = _staged(tmp_path)
    parts = run.staging.parts()
    # a duplicate in place of another row: the counts agree, the fingerprint does not
    last = parts[-1]
    path = Path(run.staging.tags_uri, last.data_file)
    data = pq.read_table(path)
    ids = data.column("image_id").to_pylist()
    pq.write_table(data.set_column(0, "image_id", pa.array(["i0", *ids[1:]])), path)
    record = Path(run.staging.path("parts", f"part-{last.seq:06d}.json"))
    fingerprint = ids_mod.fingerprint(pa.array(["i0", *ids[1:]]))
    record.write_text(json.dumps({**json.loads(record.read_text()), "ids_fingerprint": fingerprint}))
    planted = run.staging.parts()
    with pytest.raises(StagingMismatch, match=r"12 rows \(11 distinct ids\) are staged for 12 catalog rows"):
        retag_run._check_exactly_once(run, manifest, planted, 12)
    # a part lost: fewer rows than the catalog's
    with pytest.raises(StagingMismatch, match=r"10 rows \(10 distinct ids\) are staged for 12 catalog rows"):
        retag_run._check_exactly_once(run, manifest, planted[:-1], 10)


def test_fingerprints_are_order_independent_and_combine_over_parts():
    ids = pa.array([f"img/{k}.jpg" for k in range(1000)])
    whole = ids_mod.fingerprint(ids)
    assert ids_mod.fingerprint(ids.take(pa.array(list(range(999, -1, -1))))) == whole
    assert ids_mod.combine([ids_mod.fingerprint(ids.slice(0, 300)), ids_mod.fingerprint(ids.slice(300))]) == whole
    assert ids_mod.combine([whole, None]) is None and ids_mod.combine([whole, "other:00"]) is None
    assert ids_mod.fingerprint(pa.array(["a", "a"])) != ids_mod.fingerprint(pa.array(["a", "b"]))


def test_a_resume_with_another_precision_is_refused(catalog, tiny_model_dir, ray_cluster, tmp_path):
    path, _ = catalog
    out = tmp_path / "out"
    kw = {"run_id": "prec", "rows_per_part": 6, "batch_size": 4, "concurrency": 1}

    def crash(name, info):
        if name == "staged":
            raise Crash("simulated crash after the first staged part")

    with pytest.raises(Crash):
        retag(path, tiny_model_dir, out, precision="fp32", on_event=crash, **kw)
    assert json.loads(Path(RunStaging(str(out), "prec").path("run.json")).read_text())["precision"] == "fp32"
    with pytest.raises(RetagError, match=r"run id prec was started with precision='fp32', not 'int8'; rerun it"):
        retag(path, tiny_model_dir, out, precision="int8", **kw)
    summary = retag(path, tiny_model_dir, out, precision="fp32", **kw)
    assert summary["status"] == "committed" and summary["rows_ok"] == N and summary["rows_resumed"] > 0


def test_a_runs_table_written_before_precision_gains_the_column(tmp_path):
    uri = str(tmp_path / "runs")
    old = pa.schema([f for f in tables.RUNS_SCHEMA if f.name != "precision"])
    row = {"run_id": "a", "run_date": "2026-01-02", "started_at": "2026-01-02T00:00:00+00:00",
           "finished_at": "2026-01-02T01:00:00+00:00", "model_name": "m", "model_version": "1", "taxonomy": "[]",
           "catalog": "c", "rows_ok": 1, "rows_error": 0, "rows_skipped": 0}
    tables.open_or_create(uri, old)
    assert ensure_run_row(uri, row)  # an older commit's record: no precision
    assert ensure_run_row(uri, {**row, "run_id": "b", "precision": "bf16"})
    runs = tables.arrow_dataset(tables.open_table(uri)).to_table().sort_by("run_id").to_pylist()
    assert [(r["run_id"], r["precision"]) for r in runs] == [("a", None), ("b", "bf16")]


DRIVER_ONLY = """
import sys
from mumic_core import checkpoint
from mumic_core.model_config import ModelError
from pipelines.retag import dataset, plan, run  # everything a retag driver imports
from pipelines.retag.options import RetagOptions

cfg = checkpoint.read_config(sys.argv[1])
assert plan.plan_resources({"CPU": 4}, RetagOptions()).precision == "fp32"
assert plan.plan_resources({"CPU": 4, "GPU": 1}, RetagOptions()).precision == "bf16"
try:
    checkpoint.check_config(dict(cfg, model={**cfg["model"], "head_options": {"nope": 1}}))
except ModelError as e:
    print("refused:", e)
print("imported:", sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules))
"""


def test_a_retag_driver_reads_checks_and_plans_a_model_without_importing_torch(tiny_model_dir):
    """The driver only reads and checks the model's config and plans the actors (torch and open_clip are
    1.5-4 s of CPU and ~250 MB, on the start-up's critical path): they load in the inference actors only."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", DRIVER_ONLY, str(tiny_model_dir)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "unknown option(s) nope" in done.stdout, done.stdout
    assert "imported: []" in done.stdout, done.stdout
