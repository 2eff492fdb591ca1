"""The nightly re-tagging job: catalog → fetch → decode → infer (actor pool) → staged parts → one commit.

`run_retag` composes the stages with Ray Data, streams the results back to the driver (which stages them
as Parquet parts, see `tables`), commits the run to the `tags` Delta table in one transaction, appends its
`runs` row, and returns a summary. The stages themselves know nothing of Ray.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow.compute as pc
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mumic_core import checkpoint
from mumic_core.images import DEFAULT_MAX_PIXELS
from mumic_core.taxonomy import Taxonomy

from . import catalog as catalog_mod
from . import decode, fetch, models, storage, tables
from .infer import Predictor

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RetagError(ValueError):
    """A user-fixable problem with a retag invocation (one line)."""


@dataclass(frozen=True)
class RetagOptions:
    """Everything about a run besides what (catalog, model) and where (output). CLI flags map 1:1."""

    run_id: str | None = None
    full: bool = False
    top_k: int = 10
    batch_size: int = 256  # rows per model call (and per decode task batch)
    concurrency: int | None = None  # infer actors; default: one per GPU, else from the CPU count
    max_pixels: int = DEFAULT_MAX_PIXELS
    run_date: str | None = None  # YYYY-MM-DD; default: today (UTC) for a new run, the run's own on resume
    fetch_threads: int = 16
    fetch_concurrency: int | None = None  # fetch tasks at once (default: one per infer actor, at least 2)
    fetch_cpus: float = 0.25  # Ray CPUs per fetch task: I/O-bound, so several share a core
    actor_cpus: float | None = None  # Ray CPUs reserved per infer actor
    torch_threads: int | None = None  # intra-op threads per infer actor
    rows_per_part: int = 100_000  # rows per staged Parquet part (the unit of resume)
    gpus: int = 0  # GPU actors to ask for even when no GPU node is up yet (an autoscaling cluster adds them)
    progress: bool = True  # a progress line on stderr every few seconds


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Plan:
    """How the stages share the cluster (Ray logical resources + torch threads)."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    torch_threads: int | None
    decode_cpus: float
    io_cpus: float  # catalog reads and fetch tasks: I/O-bound, several share a core


def plan_resources(resources: dict, opts: RetagOptions) -> Plan:
    """GPU: one actor per GPU, decode in CPU tasks beside it. CPU only: data-parallel actors that decode
    their own batches (decode tasks with the actors' resources are fused into them by Ray Data), so no
    core waits on another stage. One logical CPU stays free for the catalog listing / read / fetch tasks
    (Ray Data's file listing task asks for a whole CPU; with none free the job would never start)."""
    cpus = float(resources.get("CPU", 1))
    gpus = max(int(resources.get("GPU", 0)), opts.gpus)
    io_cpus = opts.fetch_cpus
    if gpus:
        actors = opts.concurrency or gpus
        return Plan(actors, opts.actor_cpus or 1.0, 1.0, opts.torch_threads, 1.0, io_cpus)
    threads = opts.torch_threads or (1 if cpus < 8 else 2)
    actors = opts.concurrency or max(1, int(cpus // threads))
    actor_cpus = opts.actor_cpus or max(0.25, (cpus - 1) / actors)
    return Plan(actors, actor_cpus, 0.0, threads, actor_cpus, io_cpus)


class SnapshotDatasource(Datasource):
    """The run's catalog snapshot: one read task per Parquet row group, one block per batch.

    Not read_parquet: its file-listing task and footer-reading actors cost seconds and hundreds of MB per
    run, and a whole snapshot file would arrive as one block (no parallelism downstream).
    """

    def __init__(self, files: list[str], block_rows: int):
        super().__init__()
        self.groups = catalog_mod.row_groups(files)
        self.block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int:
        return sum(rows for _, _, rows in self.groups) * 120

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(catalog_mod.read_row_group, file, index, self.block_rows),
                BlockMetadata(num_rows=rows, size_bytes=rows * 120, exec_stats=None, input_files=None),
                schema=catalog_mod.CATALOG_SCHEMA,
            )
            for file, index, rows in self.groups
        ]


def build_dataset(
    files: list[str], num_rows: int, model_uri: str, config: dict, known_ref, opts: RetagOptions, plan: Plan
):
    """The Ray Data pipeline over a catalog snapshot; yields tag rows as pyarrow tables."""
    prep = config["preprocessing"]
    image_size = int(prep["image_size"])
    blocks = max(1, math.ceil(num_rows / opts.batch_size))
    # one block per batch (Ray splits each read task's output): many small blocks let fetch, decode and
    # infer run in parallel from the first seconds, and results stream back to the driver
    # one read task at a time: a row group reads in milliseconds, and every extra concurrent task is
    # another worker process to start
    ds = ray.data.read_datasource(
        SnapshotDatasource(files, opts.batch_size),
        num_cpus=plan.io_cpus,
        override_num_blocks=blocks,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    ds = ds.map_batches(
        fetch.fetch_batch,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_kwargs={"options": fetch.FetchOptions(threads=opts.fetch_threads)},
        num_cpus=plan.io_cpus,
        # bounded: at most fetch_concurrency * fetch_threads requests in flight against the object store
        compute=ray.data.TaskPoolStrategy(size=min(blocks, opts.fetch_concurrency or max(2, plan.actors))),
    )
    ds = ds.map_batches(
        decode.decode_batch,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_kwargs={
            "image_size": image_size,
            "max_pixels": opts.max_pixels,
            "resize_mode": prep.get("resize_mode", "shortest"),
            "known": known_ref,
        },
        num_cpus=plan.decode_cpus,
    )
    return ds.map_batches(
        Predictor,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "top_k": opts.top_k,
            "num_threads": plan.torch_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=min(plan.actors, blocks)),  # no idle actors on small runs
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )


# ---- the run ----------------------------------------------------------------------------------------------


def _is_date(text: str) -> bool:
    try:
        return bool(DATE_RE.match(text)) and dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _check_resume(manifest: dict, want: dict, explicit_date: str | None) -> None:
    for key in ("catalog", "model_name", "model_version", "full", "top_k"):
        if manifest.get(key) != want[key]:
            raise RetagError(
                f"run id {manifest['run_id']} was started with {key}={manifest.get(key)!r}, not {want[key]!r}; "
                "rerun it with the same settings or use a new --run-id"
            )
    if explicit_date and explicit_date != manifest["run_date"]:
        raise RetagError(
            f"run id {manifest['run_id']} has run_date {manifest['run_date']}, not {explicit_date}"
        )


def _progress_printer(enabled: bool) -> Callable[[str], None]:
    def emit(line: str) -> None:
        if enabled:
            print(f"mumic retag: {line}", file=sys.stderr, flush=True)
        log.info(line)

    return emit


def run_retag(
    catalog: str,
    model: str,
    output: str,
    options: RetagOptions | None = None,
    on_event: Callable[[str, dict], None] | None = None,
    **overrides,
) -> dict:
    """Tag every catalog image with `model` into the tables under `output`; returns the run summary.

    `overrides` set RetagOptions fields (run_retag(c, m, o, full=True)). `on_event(name, info)` is called
    at 'staged' (after each part) and 'before_commit' — where tests inject crashes.
    """
    opts = replace(options or RetagOptions(), **overrides)
    emit = _progress_printer(opts.progress)
    event = on_event or (lambda name, info: None)
    t_start = time.perf_counter()

    run_id = opts.run_id or new_run_id()
    if not RUN_ID_RE.match(run_id):
        raise RetagError(f"bad run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    if opts.run_date and not _is_date(opts.run_date):
        raise RetagError(f"bad run date {opts.run_date!r}: want YYYY-MM-DD")
    if opts.top_k < 0 or opts.batch_size < 1 or opts.rows_per_part < 1:
        raise RetagError("top_k must be >= 0, batch_size and rows_per_part >= 1")

    mref = models.resolve(model)
    config = checkpoint.read_config(mref.uri)
    taxonomy = Taxonomy.from_dict(config["taxonomy"])
    output = storage.normalize(output)
    tags_uri, runs_uri = storage.join(output, "tags"), storage.join(output, "runs")
    staging = tables.RunStaging(output, run_id)
    catalog_label = storage.redact(storage.normalize(catalog))

    summary = {
        "run_id": run_id,
        "output": output,
        "tags_table": tags_uri,
        "runs_table": runs_uri,
        "model_name": mref.name,
        "model_version": mref.version,
    }

    # A committed run id is never written twice; a missing runs row (crash after the commit) is repaired.
    if tables.is_committed(tags_uri, run_id):
        row = tables.run_row_from_history(tags_uri, run_id)
        repaired = bool(row) and tables.ensure_run_row(runs_uri, row)
        staging.cleanup()
        emit(
            f"run {run_id} is already committed; nothing to do" + (" (runs row repaired)" if repaired else "")
        )
        return {
            **summary,
            **_counts(row),
            "status": "already_committed",
            "runs_row_repaired": repaired,
            "run_date": (row or {}).get("run_date"),
            "rows_processed": 0,
            "seconds": 0.0,
            "images_per_s": 0.0,
        }

    want = {
        "catalog": catalog_label,
        "model_name": mref.name,
        "model_version": mref.version,
        "full": opts.full,
        "top_k": opts.top_k,
    }
    manifest = staging.read_manifest()
    if manifest is None:
        emit(f"run {run_id}: reading catalog {catalog_label}")
        snap_dir = staging.path("catalog")
        try:
            snap = catalog_mod.write_snapshot(
                catalog_mod.iter_catalog(catalog),
                snap_dir,
                check_duplicates=catalog_mod.is_manifest(catalog),
                source=f"catalog {catalog_label}",
            )
        except Exception:
            staging.cleanup()  # nothing of this run existed before; leave nothing behind
            raise
        manifest = {
            "run_id": run_id,
            "run_date": opts.run_date or dt.datetime.now(dt.UTC).date().isoformat(),
            "started_at": _now(),
            **want,
            "model_uri": storage.redact(mref.uri),
            "taxonomy": taxonomy.names,
            "taxonomy_sha256": taxonomy.sha256,
            "catalog_files": list(snap.files),
            "catalog_rows": snap.num_rows,
        }
        staging.write_manifest(manifest)  # last: a run with a manifest has a complete snapshot
    else:
        _check_resume(manifest, want, opts.run_date)
        emit(f"run {run_id}: resuming ({manifest['catalog_rows']} catalog rows)")
    run_date = manifest["run_date"]
    summary["run_date"] = run_date

    parts = staging.parts()
    rows_resumed = sum(p.rows_ok + p.rows_error + p.rows_skipped for p in parts)
    files, todo = manifest["catalog_files"], manifest["catalog_rows"] - rows_resumed
    if parts and todo > 0:
        # only the rows no part holds yet; a fresh snapshot so the pipeline reads nothing twice
        done = staging.staged_ids(parts)
        snap = catalog_mod.write_snapshot(
            catalog_mod.without_ids(catalog_mod.read_snapshot(files), done),
            staging.path(f"remaining-{len(parts):06d}"),
            check_duplicates=False,
        )
        files, todo = list(snap.files), snap.num_rows

    t_pipeline = time.perf_counter()
    processed, first_output_s = 0, 0.0
    if todo > 0:
        processed, first_output_s = _run_pipeline(
            files, todo, mref, config, manifest, staging, opts, parts, emit, event
        )
    pipeline_s = time.perf_counter() - t_pipeline

    parts = staging.parts()
    counts = {
        "rows_ok": sum(p.rows_ok for p in parts),
        "rows_error": sum(p.rows_error for p in parts),
        "rows_skipped": sum(p.rows_skipped for p in parts),
    }
    # Exactly once, checked rather than assumed: as many distinct staged ids as catalog rows, no more rows.
    staged, distinct = sum(counts.values()), pc.count_distinct(staging.staged_ids(parts)).as_py()
    if not staged == distinct == manifest["catalog_rows"]:
        raise RuntimeError(
            f"run {run_id}: {staged} rows ({distinct} distinct ids) staged for {manifest['catalog_rows']} "
            "catalog rows; not committing"
        )
    run_row = {
        "run_id": run_id,
        "run_date": run_date,
        "started_at": manifest["started_at"],
        "finished_at": _now(),
        "model_name": mref.name,
        "model_version": mref.version,
        "taxonomy": json.dumps(manifest["taxonomy"]),
        "catalog": catalog_label,
        **counts,
    }
    event("before_commit", {"run_id": run_id, **counts})
    version = tables.commit_run(tags_uri, run_id, run_date, parts, run_row)
    tables.ensure_run_row(runs_uri, run_row)
    staging.cleanup()
    total_s = time.perf_counter() - t_start
    result = {
        **summary,
        **counts,
        "status": "committed",
        "tags_version": version,
        "rows_total": manifest["catalog_rows"],
        "rows_resumed": rows_resumed,
        "rows_processed": processed,
        "seconds": round(total_s, 3),
        "pipeline_seconds": round(pipeline_s, 3),
        "first_output_seconds": round(first_output_s, 3),  # start-up: actors up, model loaded, first batch
        "images_per_s": round(processed / pipeline_s, 1) if pipeline_s > 0 and processed else 0.0,
    }
    emit(
        f"run {run_id} committed: {counts['rows_ok']} ok, {counts['rows_error']} error, "
        f"{counts['rows_skipped']} skipped in {total_s:.1f}s → {tags_uri}"
    )
    return result


def _counts(row: dict | None) -> dict:
    row = row or {}
    return {k: int(row.get(k) or 0) for k in ("rows_ok", "rows_error", "rows_skipped")}


def _run_pipeline(
    files, todo, mref, config, manifest, staging, opts, parts, emit, event
) -> tuple[int, float]:
    started_ray = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
        started_ray = True
    try:
        known_ref = None
        if not opts.full:
            known = decode.KnownDigests.from_hex(
                tables.iter_ok_hashes(storage.join(staging.output, "tags"), mref.name, mref.version)
            )
            if len(known):
                known_ref = ray.put(known.digests)
            emit(f"incremental: {len(known)} images already tagged ok by {mref.name}/{mref.version}")
        plan = plan_resources(ray.cluster_resources(), opts)
        emit(
            f"run {staging.run_id}: {todo} images → {plan.actors} infer actor(s) "
            f"({'GPU' if plan.actor_gpus else f'{plan.torch_threads} threads'}), batch {opts.batch_size}"
        )
        ds = build_dataset(files, todo, mref.uri, config, known_ref, opts, plan)
        constants = {
            "model_name": mref.name,
            "model_version": mref.version,
            "taxonomy_sha256": manifest["taxonomy_sha256"],
            "run_id": staging.run_id,
        }
        writer = tables.PartWriter(
            staging,
            manifest["run_date"],
            constants,
            opts.rows_per_part,
            first_seq=max((p.seq for p in parts), default=0),
        )
        processed, last_report, t0 = 0, time.perf_counter(), time.perf_counter()
        first_output_s = 0.0

        def staged(new_parts):
            for part in new_parts:
                event("staged", {"seq": part.seq, "rows": part.rows_ok + part.rows_error + part.rows_skipped})

        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            if not processed:
                first_output_s = time.perf_counter() - t0
            processed += batch.num_rows
            staged(writer.add(batch))
            now = time.perf_counter()
            if now - last_report >= 10:
                emit(f"{processed}/{todo} images, {processed / (now - t0):.0f} images/s")
                last_report = now
        part = writer.flush()
        staged([part] if part else [])
        return processed, first_output_s
    finally:
        if started_ray:
            ray.shutdown()


def format_summary(summary: dict) -> str:
    lines = [
        f"run            {summary['run_id']} ({summary.get('status')})",
        f"model          {summary['model_name']} version {summary['model_version']}",
        f"rows ok        {summary.get('rows_ok', 0)}",
        f"rows error     {summary.get('rows_error', 0)}",
        f"rows skipped   {summary.get('rows_skipped', 0)}",
    ]
    if summary.get("status") == "committed":
        lines += [
            f"processed      {summary['rows_processed']} images in {summary['pipeline_seconds']:.1f}s "
            f"({summary['images_per_s']:.1f} images/s); {summary['rows_resumed']} resumed from staging",
            f"run date       {summary['run_date']} (tags version {summary['tags_version']})",
        ]
    lines += [f"tags table     {summary['tags_table']}", f"runs table     {summary['runs_table']}"]
    return "\n".join(lines)
