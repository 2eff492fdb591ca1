"""`mumic vacuum`: what no commit references goes (abandoned runs' parts and staging, files earlier commits
removed), past a grace period; a run with a live lease, and a resumable one, keep everything. Real runs
on a real local Ray, on local disk and on the local S3 server."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from jobs import cli
from mumic_core import synthetic
from pipelines import storage, tables
from pipelines.retag import run_retag
from pipelines.retag.lease import LeaseInfo, read_lease
from pipelines.retag.staging import RunStaging
from pipelines.storage import files

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 24
HOUR = 3600.0


class Crash(RuntimeError):
    pass


def _crash_at_first_part(name: str, info: dict) -> None:
    if name == "staged":
        raise Crash("simulated crash after the first staged part")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("vac-catalog")
    rows = synthetic.write_dataset(folder, N_IMAGES, seed=61)
    pq.write_table(pa.Table.from_pylist([{"image_id": r["image_id"], "uri": r["uri"]} for r in rows]),
                   folder / "catalog.parquet")
    return folder / "catalog.parquet", rows


def _retag(catalog_path, model, output, **kw) -> dict:
    return run_retag(str(catalog_path), str(model), str(output), progress=False, rows_per_part=8, batch_size=8,
                     concurrency=1, **kw)


def _crash(catalog_path, model, output, run_id: str) -> None:
    with pytest.raises(Crash):
        _retag(catalog_path, model, output, run_id=run_id, full=True, on_event=_crash_at_first_part)
    _settle(output, run_id)


def _settle(output: Path, run_id: str, quiet_s: float = 2.0, limit_s: float = 60.0) -> None:
    """Wait until the crashed run's part files stop changing: the driver raised in this process, but the
    session cluster's staging tasks it had under way still finish their writes (as a crashed driver's
    workers may), and the test must see the run as it was left."""
    def listing():
        return sorted((p.name, p.stat().st_size) for p in (output / "tags").rglob(f"part-{run_id}-*.parquet"))

    last, since, start = listing(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.25)
        now = listing()
        if now != last:
            last, since = now, time.monotonic()


def _age(paths, hours: float) -> None:
    """Make files look `hours` old (the clock of a file, not of the process)."""
    t = time.time() - hours * HOUR
    for p in paths:
        os.utime(p, (t, t))


def _run_files(output: Path, run_id: str) -> list[Path]:
    """Everything a run wrote: its staging folder and its data files in `tags`."""
    return [*(output / "_staging" / run_id).rglob("*"), *(output / "tags").rglob(f"part-{run_id}-*.parquet")]


def _vacuum_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["vacuum", *args])
    return code, out.getvalue()


def _write_lease(output: Path, run_id: str, expires_in_s: float) -> LeaseInfo:
    now = time.time()
    iso = time.strftime  # UTC, whole seconds, as leases write them
    info = LeaseInfo(run_id=run_id, holder="someone-else", host="node-9", pid=777,
                     acquired_at=iso("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
                     expires_at=iso("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + expires_in_s)))
    files.write_bytes(RunStaging(str(output), run_id).lease_uri, info.to_bytes())
    return info


def _rows(tags_uri: str) -> list[dict]:
    data = tables.open_table(tags_uri).to_pyarrow_table(columns=["run_id", "image_id", "content_sha256", "scores"])
    return sorted(data.to_pylist(), key=lambda r: (r["run_id"], r["image_id"]))


def _unreferenced_on_disk(table_uri: str) -> set[str]:
    """Data files in a table's folder that its latest version does not reference."""
    table = tables.open_table(table_uri)
    on_disk = {u for u, _, _ in files.list_tree(table_uri) if u.endswith(".parquet") and "/_delta_log/" not in u}
    return on_disk - {storage.normalize(u) for u in table.file_uris()}


def test_deltalakes_full_vacuum_lists_untracked_files_by_age_and_tombstones_by_removal(tmp_path):
    """The behaviour `vacuum` relies on: `full=True` adds untracked files (judged by their mtime) to the
    tombstones (judged by their removal time); without it, untracked files are never listed."""
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"a": [1], "d": ["x"]}), partition_by=["d"])
    write_deltalake(uri, pa.table({"a": [2], "d": ["x"]}), partition_by=["d"], mode="overwrite")  # a tombstone
    old, new = tmp_path / "t" / "d=x" / "part-old-000001.parquet", tmp_path / "t" / "d=x" / "part-new-000001.parquet"
    for p in (old, new):
        pq.write_table(pa.table({"a": [3]}), p)
    _age([old], 10)
    table = DeltaTable(uri)

    def listed(hours: int, full: bool) -> set[str]:
        found = table.vacuum(retention_hours=hours, dry_run=True, enforce_retention_duration=False, full=full)
        return {os.path.basename(f) for f in found}

    tombstone = {os.path.basename(f) for f in _removed(uri)}
    assert listed(1, full=False) == set()
    assert listed(1, full=True) == {old.name}  # untracked and older than an hour; the tombstone is new
    assert listed(0, full=True) == {old.name, new.name} | tombstone
    assert listed(0, full=False) == tombstone  # untracked files only with full=True
    assert len(tombstone) == 1 and old.exists() and new.exists()  # dry runs delete nothing


def _removed(uri: str) -> set[str]:
    """Paths of the remove actions in a local Delta log."""
    out = set()
    for log in sorted(Path(uri, "_delta_log").glob("*.json")):
        for line in log.read_text().splitlines():
            if "remove" in json.loads(line):
                out.add(json.loads(line)["remove"]["path"])
    return out


@pytest.mark.slow
def test_vacuum_removes_abandoned_runs_keeps_live_and_resumable_ones_then_tombstones(
    catalog, tiny_model_dir, ray_cluster, tmp_path
):
    catalog_path, rows = catalog
    output = tmp_path / "out"
    first = _retag(catalog_path, tiny_model_dir, output, run_id="first")
    assert first["status"] == "committed"
    _crash(catalog_path, tiny_model_dir, output, "abandoned")
    _crash(catalog_path, tiny_model_dir, output, "resumable")
    abandoned_files = [p for p in _run_files(output, "abandoned") if p.is_file()]
    # the parts the abandoned run's workers had staged when its driver crashed (at least the first)
    abandoned_parts = sorted((output / "tags").rglob("part-abandoned-*.parquet"))
    staged_part = abandoned_parts[0]
    ghost = staged_part.parent / "part-ghost-000001.parquet"  # a part whose staging is gone
    shutil.copy(staged_part, ghost)
    _age([*abandoned_files, ghost, *(output / "tags").rglob("part-first-*.parquet")], 48)
    before = {p: p.stat().st_size for p in (output / "tags").rglob("*.parquet")}
    live = _write_lease(output, "abandoned", expires_in_s=3600)

    code, printed = _vacuum_cli("--output", str(output), "--grace-hours", "24", "--dry-run")
    assert code == 0 and printed.startswith(f"would remove 1 data file(s) ({ghost.stat().st_size / 2**20:.1f} MB)")
    assert f"kept run abandoned: live lease: host node-9 pid 777 since {live.acquired_at}" in printed
    assert "kept run resumable: staged within the grace period (resumable)" in printed
    assert {p: p.stat().st_size for p in (output / "tags").rglob("*.parquet")} == before  # nothing removed

    code, printed = _vacuum_cli("--output", str(output), "--grace-hours", "24")
    assert code == 0 and printed.splitlines()[0].startswith("removed 1 data file(s)")
    assert not ghost.exists() and all(p.exists() for p in abandoned_files)  # a live lease: untouched
    assert read_lease(RunStaging(str(output), "abandoned").lease_uri) == live

    _write_lease(output, "abandoned", expires_in_s=-60)  # its holder died long ago
    report_size = sum(p.stat().st_size for p in abandoned_files)
    code, printed = _vacuum_cli("--output", str(output), "--grace-hours", "24", "--json")
    report = json.loads(printed)
    assert (report["data_files"], report["staging_runs"]) == (len(abandoned_parts), ["abandoned"])
    assert report["data_bytes"] + report["staging_bytes"] == report_size
    assert report["staging_files"] == len(abandoned_files) - len(abandoned_parts)  # all but the data files
    assert not (output / "_staging" / "abandoned").exists() and not any(p.exists() for p in abandoned_files)
    assert report["kept"] == {"resumable": "staged within the grace period (resumable)"}
    committed = tables.open_table(str(output / "tags")).to_pyarrow_table(columns=["image_id"])
    assert committed.num_rows == N_IMAGES  # the committed run is whole

    resumed = _retag(catalog_path, tiny_model_dir, output, run_id="resumable", full=True)  # parts kept intact
    assert resumed["status"] == "committed" and resumed["rows_ok"] == N_IMAGES
    assert resumed["rows_resumed"] in (8, 16, 24)  # whole parts of 8, staged before its crash

    # files removed by commits: compact `tags` (rewrites its files), then a grace of 0 removes the old ones
    tags_uri = str(output / "tags")
    rows_before = _rows(tags_uri)
    tables.open_table(tags_uri).optimize.compact()
    stale = {t: _unreferenced_on_disk(str(output / t)) for t in ("tags", "runs", "current")
             if tables.open_table(str(output / t)) is not None}
    assert len(stale["tags"]) >= 2
    code, printed = _vacuum_cli("--output", str(output), "--grace-hours", "0", "--json")
    report = json.loads(printed)
    assert report["data_files"] == sum(map(len, stale.values())) and report["staging_runs"] == []
    assert all(not _unreferenced_on_disk(str(output / t)) for t in stale)  # every table holds only live files
    assert _rows(tags_uri) == rows_before


# On S3 the runs and vacuum are processes of their own: some Delta reads (history, vacuum's listing) hold
# the GIL during their S3 requests, which the S3 server thread of this process then never answers.
DRIVER = r"""
import json, sys
cfg = json.loads(sys.argv[1])
from pipelines.retag import run_retag

for run_id, crash in cfg["runs"]:  # one after the other, in one process (each process costs seconds)
    def on_event(name, info):
        if name == "staged" and crash:
            raise SystemExit(3)  # a crash after the first staged part

    run_retag(cfg["catalog"], cfg["model"], cfg["output"], on_event=on_event, run_id=run_id, **cfg["options"])
"""


def _retag_process(ray_cluster, tmp_path: Path, catalog_path, model, output: str, runs: list[tuple[str, bool]]) -> int:
    """The runs (run_id, crash after the first staged part?) in order, in one driver process."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    options = {"progress": False, "rows_per_part": 8, "batch_size": 8, "concurrency": 1, "full": True}
    cfg = {"catalog": str(catalog_path), "model": str(model), "output": output, "options": options, "runs": runs}
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    r = subprocess.run([sys.executable, str(script), json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == (3 if runs[-1][1] else 0), r.stderr[-3000:]
    return r.returncode


@pytest.mark.slow
def test_vacuum_on_s3_removes_an_abandoned_runs_parts_and_staging(
    catalog, tiny_model_dir, ray_cluster, s3_bucket, tmp_path
):
    catalog_path, rows = catalog
    output = f"s3://{s3_bucket}/out"
    runs = [("s3-first", False), ("s3-abandoned", True)]  # a committed run, then one whose driver crashes
    _retag_process(ray_cluster, tmp_path, catalog_path, tiny_model_dir, output, runs)
    staged = files.list_tree(f"{output}/_staging/s3-abandoned")
    parts = [f for f in files.list_tree(f"{output}/tags") if "part-s3-abandoned-" in f[0]]
    assert staged and len(parts) >= 1  # at least the part the driver crashed on
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "vacuum", "--output", output, "--grace-hours", "0",
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert (report["data_files"], report["data_bytes"]) == (len(parts), sum(p[1] for p in parts))
    assert report["staging_runs"] == ["s3-abandoned"] and report["staging_files"] == len(staged)
    assert files.list_tree(f"{output}/_staging/s3-abandoned") == []
    assert not [f for f in files.list_tree(f"{output}/tags") if "part-s3-abandoned-" in f[0]]
    tags = tables.open_table(f"{output}/tags").to_pyarrow_table(columns=["image_id", "run_id"])
    assert tags.num_rows == N_IMAGES and set(tags.column("run_id").to_pylist()) == {"s3-first"}


# ---- the tables of other commands, and the search index ------------------------------------------------

MODEL = ("m", "1")


def _write_current(output: Path, seed: int, n: int = 40) -> None:
    """Replace `current` with n rows of model MODEL (new embeddings and tags_version: every row changed, so
    the next index update is a rebuild, a new generation); the last row has the first row's bytes."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        {"image_id": f"img-{i:03d}", "uri": f"/data/img-{i:03d}.jpg", "content_sha256": f"{i % (n - 1):064x}",
         "status": "ok", "labels": [{"label": "red", "score": 0.9}], "embedding": v.tolist(),
         "model_name": MODEL[0], "model_version": MODEL[1], "tags_version": seed}
        for i, v in enumerate(vectors)
    ]
    write_deltalake(str(output / "current"), pa.Table.from_pylist(rows, schema=tables.CURRENT_SCHEMA), mode="overwrite")


def _drift_rows(change: float) -> list[dict]:
    return [{"from_run_id": "run-a", "to_run_id": "run-b", "scope": "current", "label": label, "change": change}
            for label in ("red", "green")]


def _vacuum_json(output: Path, grace_hours: float, *extra: str) -> dict:
    code, printed = _vacuum_cli("--output", str(output), "--grace-hours", str(grace_hours), "--json", *extra)
    assert code == 0
    return json.loads(printed)


def test_vacuum_cleans_the_drift_and_duplicates_tables_and_index_generations_no_manifest_names(tmp_path):
    """`drift` and `duplicates` by the tables' rule (tombstones by removal time, untracked files by age);
    index generations the manifest no longer names once they, and the manifest, are past the grace period
    and the index store's hour (a reader of the replaced manifest may still read its files)."""
    from pipelines import index
    from pipelines.drift.table import write_comparison
    from pipelines.index import store

    out = tmp_path / "out"
    for seed in (1, 2):  # two generations, and a `duplicates` table replaced once
        _write_current(out, seed)
        found = index.find_duplicates(str(out), MODEL, threshold=0.95)
    _write_current(out, 3)
    assert index.refresh(str(out), MODEL).rebuilt  # a third generation
    write_comparison(str(out), _drift_rows(0.1))
    write_comparison(str(out), _drift_rows(0.2))  # replaces the comparison's rows: tombstones
    stray = out / "drift" / "part-00000-stray.parquet"  # a writer that died before its commit
    pq.write_table(pa.table({"label": ["x"]}), stray)
    _age([stray], 2)
    folder = Path(store.index_dir(str(out), MODEL))
    manifest = store.read_manifest(str(out), MODEL)
    current_files = {store.MANIFEST, manifest["index_file"], manifest["keys_file"]}
    old_generations = sorted(p for p in folder.iterdir() if p.name not in current_files)
    assert len(old_generations) == 4  # index + keys of generations 1 and 2
    groups = sorted(tables.arrow_dataset(tables.open_table(str(out / "duplicates"))).to_table().to_pylist(),
                    key=lambda r: r["image_id"])
    assert found.groups >= 1 and any(r["exact_duplicate"] for r in groups)
    rewritten = ("drift", "duplicates", "current")
    tombstones = {name: _unreferenced_on_disk(str(out / name)) for name in rewritten}
    assert tombstones["drift"] >= {storage.normalize(str(stray))} and len(tombstones["duplicates"]) >= 1

    # grace 1 h: the 2 h old stray file goes; the tombstones (removed just now) and the index stay
    report = _vacuum_json(out, 1)
    assert (report["data_files"], report["index_files"]) == (1, 0) and not stray.exists()
    assert report["data_bytes"] > 0
    # grace 0: the tombstones go too, and a dry run first removes nothing
    want = sum(len(t) for t in tombstones.values()) - 1
    assert _vacuum_json(out, 0, "--dry-run")["data_files"] == want
    assert all(_unreferenced_on_disk(str(out / name)) for name in rewritten)
    assert _vacuum_json(out, 0)["data_files"] == want
    assert not any(_unreferenced_on_disk(str(out / name)) for name in rewritten)
    after = tables.arrow_dataset(tables.open_table(str(out / "duplicates"))).to_table().to_pylist()
    assert sorted(after, key=lambda r: r["image_id"]) == groups
    drift = tables.arrow_dataset(tables.open_table(str(out / "drift"))).to_table()
    assert sorted(drift.column("change").to_pylist()) == [0.2, 0.2]
    assert all(p.exists() for p in old_generations)  # written within the index store's hour

    _age(old_generations, 3)  # old generations, but the manifest was published just now
    assert _vacuum_json(out, 0)["index_files"] == 0 and all(p.exists() for p in old_generations)
    _age([folder / store.MANIFEST], 2)
    assert _vacuum_json(out, 4)["index_files"] == 0  # not past the grace period
    sizes = sum(p.stat().st_size for p in old_generations)
    report = _vacuum_json(out, 2)
    assert (report["index_files"], report["index_bytes"]) == (4, sizes) and sizes > 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(current_files)
    searched, hits = index.search_index(str(out), np.ones(16, np.float32), 3, MODEL)  # the index still works
    assert searched["rows"] == 40 and len(hits) == 3
