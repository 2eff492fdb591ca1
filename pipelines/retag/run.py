"""The nightly re-tagging job: catalog → fetch → decode → infer (actor pool) → staged parts → one commit.

Commit protocol (one retag run = one Delta transaction on `tags`):
1. The pipeline's last stage writes its output as Parquet parts (`staging`), on the workers: invisible until
   committed; only the parts' records reach the driver.
2. When every catalog row is staged exactly once (counts and id fingerprints, `ids`), ONE transaction adds all data files (`commit`), carrying
   the app transaction `mumic-retag:<run_id>` and the run's summary in its commit metadata.
3. The `runs` row is appended next (app transaction `mumic-runs:<run_id>`), then staging is removed.
A crash before 2 leaves nothing visible and a rerun with the same id resumes from the recorded parts;
a crash between 2 and 3 is repaired by the rerun from the commit metadata; a committed run id is never
written again. One writer per run id at a time: a lease in the run's staging (`lease`) enforces it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow.compute as pc
import ray
from deltalake.exceptions import DeltaError

from mumic_core import checkpoint
from mumic_core.taxonomy import Taxonomy

from .. import storage
from ..cluster import ray_session
from ..index import refresh_after_run
from ..progress import Progress
from ..registry import ModelRef, alias_version, parse_ref, resolve_model
from ..tables import current_uri, iter_ok_hashes
from ..tables.queries import iter_known_objects
from . import catalog as catalog_mod
from . import ids as ids_mod
from . import unchanged
from .commit import commit_run, commit_version, ensure_run_row, is_committed, run_row_from_history
from .current import RunFacts, is_merged, update_current
from .dataset import PartSpec, Tally, actor_pool_size, build_dataset, startup_failure, tally_name
from .decode import KnownDigests
from .lease import RunLease
from .options import CommitFailed, RetagError, RetagOptions, StagingMismatch, TooManyErrors, new_run_id
from .plan import plan_resources
from .staging import PartWriter, RunStaging, StagedPart

COUNTS = ("rows_ok", "rows_error", "rows_skipped")
# a run's start-up, step by step, in its summary: Ray up (local start or join), every inference actor's
# model loaded, the first batch inferred; the last two counted from when the driver starts draining the
# built dataset (after Ray is up), so both fall inside `pipeline_seconds`
STARTUP_KEYS = ("ray_start_seconds", "actors_ready_seconds", "first_output_seconds")
# precision: the resolved one the actors run, known once the pipeline's plan is (`_record_precision`)
RESUME_KEYS = ("catalog", "model_name", "model_version", "full", "top_k", "requested_precision", "precision")
_NEWER_KEYS = ("requested_precision",)  # absent from the manifests of runs started before them: not checked

Event = Callable[[str, dict], None]


@dataclass(frozen=True)
class Run:
    """One invocation: what, with which model, where, and how."""

    run_id: str
    catalog: str
    catalog_label: str  # the catalog location as recorded (credentials redacted)
    model: ModelRef
    config: dict  # the saved model's config.json
    output: str
    staging: RunStaging
    opts: RetagOptions
    say: Progress
    event: Event

    @property
    def tags_uri(self) -> str:
        return storage.join(self.output, "tags")

    @property
    def runs_uri(self) -> str:
        return storage.join(self.output, "runs")

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "output": self.output,
            "tags_table": self.tags_uri,
            "runs_table": self.runs_uri,
            "model_name": self.model.name,
            "model_version": self.model.version,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def run_retag(
    catalog: str,
    model: str,
    output: str,
    options: RetagOptions | None = None,
    on_event: Event | None = None,
    **overrides,
) -> dict:
    """Tag every catalog image with `model` into the tables under `output`; returns the run summary.

    `overrides` set RetagOptions fields (run_retag(c, m, o, full=True)). `on_event(name, info)` is called
    at 'staged' (after each part) and 'before_commit' — where tests inject crashes.
    """
    started = time.perf_counter()
    run = _prepare(catalog, model, output, replace(options or RetagOptions(), **overrides), on_event)
    lease = RunLease(run.staging.lease_uri, run.run_id, say=run.say).acquire()  # one writer per run id
    try:
        if is_committed(run.tags_uri, run.run_id):
            lease.check()
            return _already_committed(run)
        manifest = _start_or_resume(run)
        _record_writer(run, manifest, lease)
        files, todo, rows_resumed = _remaining(run, manifest)
        known = {p.seq for p in run.staging.parts()}  # staged before the pipeline: by earlier attempts, the split
        t_pipeline = time.perf_counter()
        processed, startup, seqs = _stage_rest(run, manifest, files, todo, known) if todo > 0 else (0, {}, set())
        pipeline_s = time.perf_counter() - t_pipeline
        lease.check()  # a writer that stalled past its lease's expiry must not commit beside its successor
        counts, version = _verify_and_commit(run, manifest, known | seqs)
    finally:
        lease.release()
    total_s = time.perf_counter() - started
    run.say(
        f"run {run.run_id} committed: {counts['rows_ok']} ok, {counts['rows_error']} error, "
        f"{counts['rows_skipped']} skipped ({counts['rows_not_fetched']} unread) in {total_s:.1f}s → {run.tags_uri}"
    )
    return {
        **run.summary(),
        **counts,
        "run_date": manifest["run_date"],
        "status": "committed",
        "tags_version": version,
        "rows_total": manifest["catalog_rows"],
        "rows_resumed": rows_resumed,
        "rows_processed": processed,
        "seconds": round(total_s, 3),
        "pipeline_seconds": round(pipeline_s, 3),
        # start-up, step by step (`_startup`): Ray up; every inference actor's model loaded; the first batch
        **{key: round(startup.get(key, 0.0), 3) for key in STARTUP_KEYS},
        "images_per_s": round(processed / pipeline_s, 1) if pipeline_s > 0 and processed else 0.0,
    }


def _prepare(catalog: str, model: str, output: str, opts: RetagOptions, on_event: Event | None) -> Run:
    """Check the options and resolve the model reference (nothing is written yet): a rerun of a started
    run id keeps the model version its manifest records, wherever the alias points now."""
    run_id = opts.run_id or new_run_id()
    output = storage.normalize(output)
    staging, say = RunStaging(output, run_id), Progress("retag", opts.progress)
    mref = resolve_model(_pinned_model(model, staging, say) if opts.run_id else model)
    return Run(
        run_id=run_id,
        catalog=catalog,
        catalog_label=storage.redact(storage.normalize(catalog)),
        model=mref,
        config=checkpoint.read_config(mref.uri),
        output=output,
        staging=staging,
        opts=opts,
        say=say,
        event=on_event or (lambda name, info: None),
    )


def _pinned_model(model: str, staging: RunStaging, say: Progress) -> str:
    """`models:/NAME@ALIAS` (or `/latest`) for a run id whose manifest exists → `models:/NAME/<its
    model_version>`: a resumed run finishes with the version it started with, even if the alias moved."""
    if not str(model).startswith("models:/"):
        return model
    name, alias, ref_version = parse_ref(model)
    moving = alias is not None or ref_version == "latest"
    manifest = staging.read_manifest() if moving else None
    if not manifest or manifest.get("model_name") != name or not manifest.get("model_version"):
        return model
    version = str(manifest["model_version"])
    now = alias_version(name, alias) if alias is not None else None
    moved = f"; @{alias} is now version {now}" if now not in (None, version) else ""
    say(f"run {staging.run_id}: resuming with models:/{name}/{version}, the version it started with{moved}")
    return f"models:/{name}/{version}"


def _record_writer(run: Run, manifest: dict, lease: RunLease) -> None:
    """Who started the run, and who resumed it, in its manifest (`writers`, first = who started it)."""
    manifest["writers"] = [*manifest.get("writers", []), lease.record()]
    run.staging.write_manifest(manifest)


def _already_committed(run: Run) -> dict:
    """A committed run id is never written twice; what a crash after the commit left undone (the runs
    row, the `current` MERGE) is done now."""
    row = run_row_from_history(run.tags_uri, run.run_id)
    repaired = bool(row) and ensure_run_row(run.runs_uri, row)
    merged = None
    if row and not is_merged(current_uri(run.output), run.run_id):
        parts = run.staging.parts() if run.staging.read_manifest() is not None else None
        merged = _update_current(run, row["run_date"], commit_version(run.tags_uri, run.run_id), parts)
    run.staging.cleanup()
    fixed = [what for what, done in (("runs row", repaired), ("current table", merged is not None)) if done]
    run.say(f"run {run.run_id} is already committed; " + (f"repaired: {', '.join(fixed)}" if fixed else "nothing to do"))
    return {
        **run.summary(),
        **{k: int((row or {}).get(k) or 0) for k in (*COUNTS, "rows_not_fetched")},
        "status": "already_committed",
        "runs_row_repaired": repaired,
        "current_repaired": merged is not None,
        "run_date": (row or {}).get("run_date"),
        "rows_processed": 0,
        "seconds": 0.0,
        "images_per_s": 0.0,
    }


def _start_or_resume(run: Run) -> dict:
    """The run's manifest: read back when resuming (same settings required), else snapshot the catalog
    and write it. A run with a manifest has a complete catalog snapshot."""
    want = {
        "catalog": run.catalog_label,
        "model_name": run.model.name,
        "model_version": run.model.version,
        "full": run.opts.full,
        "top_k": run.opts.top_k,
        "requested_precision": run.opts.precision,  # refused on resume even when nothing is left to infer
    }
    manifest = run.staging.read_manifest()
    if manifest is not None:
        _check_resume(manifest, want, run.opts.run_date)
        run.say(f"run {run.run_id}: resuming ({manifest['catalog_rows']} catalog rows)")
        return manifest
    run.say(f"run {run.run_id}: reading catalog {run.catalog_label}")
    try:
        snap = catalog_mod.write_snapshot(
            catalog_mod.iter_catalog(run.catalog),
            run.staging.path("catalog"),
            check_duplicates=catalog_mod.is_manifest(run.catalog),
            source=f"catalog {run.catalog_label}",
            fingerprint=True,
        )
    except Exception:
        run.staging.cleanup()  # nothing of this run existed before; leave nothing behind
        raise
    taxonomy = Taxonomy.from_dict(run.config["taxonomy"])
    manifest = {
        "run_id": run.run_id,
        "run_date": run.opts.run_date or dt.datetime.now(dt.UTC).date().isoformat(),
        "started_at": _now(),
        **want,
        "model_uri": storage.redact(run.model.uri),
        "taxonomy": taxonomy.names,
        "taxonomy_sha256": taxonomy.sha256,
        "catalog_files": list(snap.files),
        "catalog_rows": snap.num_rows,
        "catalog_fingerprint": snap.fingerprint,
        "precision": None,  # resolved when the pipeline's plan is made
    }
    run.staging.write_manifest(manifest)
    return manifest


def _check_resume(manifest: dict, want: dict, explicit_date: str | None) -> None:
    for key in (k for k in RESUME_KEYS if k in want and (k in manifest or k not in _NEWER_KEYS)):
        if manifest.get(key) != want[key]:
            raise RetagError(
                f"run id {manifest['run_id']} was started with {key.removeprefix('requested_')}="
                f"{manifest.get(key)!r}, not {want[key]!r}; "
                "rerun it with the same settings or use a new --run-id"
            )
    if explicit_date and explicit_date != manifest["run_date"]:
        raise RetagError(
            f"run id {manifest['run_id']} has run_date {manifest['run_date']}, not {explicit_date}"
        )


def _remaining(run: Run, manifest: dict) -> tuple[list[str], int, int]:
    """(snapshot files, rows) still to process, and the rows already staged by an earlier attempt.

    Rows unchanged since `current` tagged them are staged first, as skipped unread (`unchanged`); what is
    left for the pipeline is recorded in the manifest (`todo`), so a resume leaves out only what the
    pipeline staged since, not the whole catalog's staged ids."""
    parts = run.staging.parts()
    rows_resumed = sum(p.rows for p in parts)
    todo = manifest.get("todo")
    if todo is not None:
        later = [p for p in parts if p.seq > todo["after_seq"]]
        files, rows = todo["files"], todo["rows"] - sum(p.rows for p in later)
        if later and rows > 0:
            files, rows = _without_staged(run, files, later, f"remaining-{len(parts):06d}")
        return files, rows, rows_resumed
    files, rows = manifest["catalog_files"], manifest["catalog_rows"] - rows_resumed
    if parts and rows > 0:
        files, rows = _without_staged(run, files, parts, f"remaining-{len(parts):06d}")
    if rows > 0 and run.opts.skip_unchanged and not run.opts.full:
        files, rows = _split_unchanged(run, manifest, files, rows)
    return files, rows, rows_resumed


def _without_staged(run: Run, files: list[str], parts: list[StagedPart], name: str) -> tuple[list[str], int]:
    """The snapshot's rows no part holds yet, as a fresh snapshot: the pipeline reads nothing twice."""
    schema = catalog_mod.snapshot_schema(files)
    snap = catalog_mod.write_snapshot(
        catalog_mod.without_ids(catalog_mod.read_snapshot(files), run.staging.staged_ids(parts)),
        run.staging.path(name),
        check_duplicates=False,
        schema=schema,
    )
    return list(snap.files), snap.num_rows


def _split_unchanged(run: Run, manifest: dict, files: list[str], rows: int) -> tuple[list[str], int]:
    """Stage the rows whose object is unchanged since `current` tagged it (same size and ETag / mtime,
    ok, this model and taxonomy) as skipped, with no GET; the rest, recorded as the run's `todo`."""
    t0 = time.perf_counter()
    known = unchanged.KnownObjects.from_batches(
        iter_known_objects(current_uri(run.output), run.model.name, run.model.version, manifest["taxonomy_sha256"])
    )
    if not len(known):
        return files, rows
    writer = _part_writer(run, manifest)

    def stage(table) -> None:
        for part in writer.add(table):
            run.event("staged", {"seq": part.seq, "rows": part.rows, "unchanged": True})

    snap = catalog_mod.write_snapshot(
        unchanged.split(catalog_mod.read_snapshot(files), known, stage),
        run.staging.path(f"todo-{writer.seq:06d}"),
        check_duplicates=False,
        schema=unchanged.TODO_SCHEMA,
    )
    part = writer.flush()
    if part:
        run.event("staged", {"seq": part.seq, "rows": part.rows, "unchanged": True})
    manifest["todo"] = {"files": list(snap.files), "rows": snap.num_rows, "after_seq": writer.seq}
    run.staging.write_manifest(manifest)  # from here a resume starts from the todo rows
    run.say(
        f"run {run.run_id}: {rows - snap.num_rows} of {rows} images unchanged since current tagged them "
        f"(same size and ETag / mtime): skipped unread in {time.perf_counter() - t0:.1f}s"
    )
    return list(snap.files), snap.num_rows


def _constants(run: Run, manifest: dict) -> dict[str, str]:
    """The columns every tags row of the run holds the same value in."""
    return {
        "model_name": run.model.name,
        "model_version": run.model.version,
        "taxonomy_sha256": manifest["taxonomy_sha256"],
        "run_id": run.run_id,
    }


def _part_writer(run: Run, manifest: dict) -> PartWriter:
    """The driver's part writer (for unchanged rows), numbering after the parts already staged."""
    return PartWriter(
        run.staging,
        manifest["run_date"],
        _constants(run, manifest),
        run.opts.rows_per_part,
        first_seq=max((p.seq for p in run.staging.parts()), default=0),
    )


def _stage_rest(
    run: Run, manifest: dict, files: list[str], todo: int, known: set[int]
) -> tuple[int, dict[str, float], set[int]]:
    """Run the pipeline over the remaining rows, its workers staging its output; (rows processed, the
    start-up's steps in seconds (STARTUP_KEYS), the seqs of the parts it staged)."""
    t_ray = time.perf_counter()
    with ray_session():
        ray_start_s = time.perf_counter() - t_ray  # ~0 on a cluster that was already up
        known_ref = _known_digests(run)
        plan = plan_resources(ray.cluster_resources(), run.opts)
        _record_precision(run, manifest, plan.precision)
        actors = actor_pool_size(plan, todo, run.opts.batch_size)
        run.say(
            f"run {run.run_id}: {todo} images → {actors} infer actor(s) "
            f"({'GPU' if plan.actor_gpus else f'{plan.torch_threads} threads'}, {plan.precision}), "
            f"batch {run.opts.batch_size}"
        )
        # named, so that a watcher (a test, an operator) can read how far the run's inference is
        tally = Tally.options(name=tally_name(run.run_id)).remote()
        # the pipeline's parts are numbered above every part staged before it (`todo.after_seq` included); a
        # write that a killed attempt still had under way is not among `known` nor this attempt's: not committed
        spec = PartSpec(run.staging, manifest["run_date"], _constants(run, manifest), run.opts.rows_per_part,
                        seq_base=max(known, default=0))
        ds = build_dataset(
            files, todo, run.model.uri, run.config, known_ref, run.opts, plan, _allowed_roots(run), spec, tally
        )
        try:
            processed, startup, seqs = _drain(run, ds, tally, todo, actors)
            return processed, {"ray_start_seconds": ray_start_s, **startup}, seqs
        except Exception as e:  # GPU actors never placed, or an actor without its device: one line
            failure = startup_failure(e, plan, run.opts)
            if failure is None:
                raise
            raise failure from None
        finally:
            ray.kill(tally)


def _record_precision(run: Run, manifest: dict, precision: str) -> None:
    """The precision the actors run, in the manifest: a resume must run the one its run started with
    (`auto` resolves per device: a run started on a GPU does not finish on a CPU in fp32)."""
    if manifest.get("precision") is not None:
        _check_resume(manifest, {"precision": precision}, None)
        return
    manifest["precision"] = precision
    run.staging.write_manifest(manifest)


def _allowed_roots(run: Run) -> tuple[str, ...]:
    """The local folders catalog rows may point into: the catalog's own (a manifest's folder, or the
    listed folder) and --allow-root; an s3:// catalog's rows may read no local file unless allowed."""
    catalog = storage.normalize(run.catalog)
    own = [] if storage.is_remote(catalog) else [storage.parent(catalog) if catalog_mod.is_manifest(catalog) else catalog]
    return storage.confine([*own, *run.opts.allow_root])


def _known_digests(run: Run):
    """The content hashes this model version already tagged ok, in the object store (None with --full)."""
    if run.opts.full:
        return None
    known = KnownDigests.from_hex(iter_ok_hashes(run.tags_uri, run.model.name, run.model.version))
    run.say(f"incremental: {len(known)} images already tagged ok by {run.model.name}/{run.model.version}")
    return ray.put(known.digests) if len(known) else None


def _drain(run: Run, ds, tally, todo: int, actors: int) -> tuple[int, dict[str, float], set[int]]:
    """Take the staged parts' records as the workers write them (the rows stay on the workers); the
    progress lines and the start-up's steps come from the tally the inference actors tell."""
    t0, wall0, stop = time.perf_counter(), time.time(), threading.Event()
    watch = threading.Thread(target=_watch, args=(run, tally, todo, t0, stop), daemon=True)
    watch.start()
    processed, seqs = 0, set()
    records = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        for batch in records:
            for record in batch.to_pylist():
                part = StagedPart(**record)
                processed += part.rows
                seqs.add(part.seq)
                run.event("staged", {"seq": part.seq, "rows": part.rows})
    finally:
        stop.set()
        # a driver that stops here (a crash, an error) stops the pipeline's writers too
        getattr(records, "close", lambda: None)()
        watch.join(timeout=5)
    return processed, _startup(tally, wall0, actors), seqs


def _startup(tally, wall0: float, actors: int) -> dict[str, float]:
    """Seconds from `wall0` (draining began) until every one of the first `actors` inference actors had loaded
    its model (a restarted actor tells again later: not counted), and until the first batch was inferred."""
    (_, first_at), ready = ray.get([tally.read.remote(), tally.ready_times.remote()])
    ready_at = ready[:actors][-1] if ready else None
    return {
        "actors_ready_seconds": max(0.0, ready_at - wall0) if ready_at else 0.0,
        "first_output_seconds": max(0.0, first_at - wall0) if first_at else 0.0,
    }


def _watch(run: Run, tally, todo: int, t0: float, stop: threading.Event) -> None:
    """A progress line every 10 s from the tally, while the pipeline runs."""
    while not stop.wait(10):
        try:
            rows, _ = ray.get(tally.read.remote(), timeout=10)
        except ray.exceptions.RayError:  # the pipeline is ending (its tally killed): no more lines
            return
        run.say(f"{rows}/{todo} images, {rows / max(time.perf_counter() - t0, 1e-9):.0f} images/s")


def _verify_and_commit(run: Run, manifest: dict, seqs: set[int]) -> tuple[dict, int | None]:
    """Exactly once, checked rather than assumed (`_check_exactly_once`), and not an outage (the error
    ceiling); then the one commit, the runs row, the `current` MERGE, and staging removed. `seqs`: the
    parts this attempt found or staged (not one a killed attempt's worker recorded since)."""
    parts = [p for p in run.staging.parts() if p.seq in seqs]
    counts = {k: sum(getattr(p, k) for p in parts) for k in COUNTS}
    _check_exactly_once(run, manifest, parts, sum(counts.values()))
    _check_error_ceiling(run, parts, counts, manifest["catalog_rows"])
    run_row = {
        "run_id": run.run_id,
        "run_date": manifest["run_date"],
        "started_at": manifest["started_at"],
        "finished_at": _now(),
        "model_name": run.model.name,
        "model_version": run.model.version,
        "taxonomy": json.dumps(manifest["taxonomy"]),
        "catalog": run.catalog_label,
        **counts,
        "rows_not_fetched": sum(p.rows_not_fetched for p in parts),  # skipped unread: unchanged objects
        "precision": manifest.get("precision"),  # None: no image went through the model in this run
    }
    run.event("before_commit", {"run_id": run.run_id, **counts})
    try:
        version = commit_run(run.tags_uri, run.run_id, manifest["run_date"], parts, run_row)
        ensure_run_row(run.runs_uri, run_row)
        run.event("before_current", {"run_id": run.run_id})
        _update_current(run, manifest["run_date"], version, parts)
    except (OSError, DeltaError) as e:  # the store failed a write: every commit is all or nothing
        line = storage.redact(str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommitFailed(
            f"run {run.run_id}: writing its commit failed ({line[:300]}); nothing half-done is visible: "
            f"rerun with --run-id {run.run_id} to finish it"
        ) from e
    run.staging.cleanup()
    return {**counts, "rows_not_fetched": run_row["rows_not_fetched"]}, version


def _check_exactly_once(run: Run, manifest: dict, parts: list[StagedPart], staged: int) -> None:
    """Every catalog row staged once: as many rows as the catalog and the same id fingerprint (O(parts));
    else, or for a run staged before fingerprints, the exact check (as many distinct staged ids as
    catalog rows, no more rows), which names what is wrong."""
    fingerprint = ids_mod.combine(p.ids_fingerprint for p in parts)
    counted = all(p.ids_count == p.rows for p in parts)
    expected = manifest.get("catalog_fingerprint")  # absent: a run started before fingerprints
    if expected is not None and fingerprint == expected and counted and staged == manifest["catalog_rows"]:
        return
    distinct = pc.count_distinct(run.staging.staged_ids(parts)).as_py()
    if not staged == distinct == manifest["catalog_rows"]:
        raise StagingMismatch(
            f"run {run.run_id}: {staged} rows ({distinct} distinct ids) are staged for {manifest['catalog_rows']} "
            f"catalog rows, so committing would duplicate or lose rows; nothing was committed. To start it over, "
            f"delete {storage.redact(run.staging.dir)} and rerun with --run-id {run.run_id} (or use a new "
            f"--run-id); `mumic vacuum --output {storage.redact(run.output)}` then removes the parts it had staged"
        )


def _update_current(run: Run, run_date: str, tags_version: int | None, parts: list[StagedPart] | None):
    """The run's one update of `current` (see `current`); what changed."""
    facts = RunFacts(
        run_id=run.run_id,
        run_date=run_date,
        tags_version=int(tags_version if tags_version is not None else -1),
        model_name=run.model.name,
        model_version=run.model.version,
        seen_at=dt.datetime.now(dt.UTC),
    )
    metrics = update_current(run.output, facts, parts, prune=run.opts.prune)
    if metrics:
        run.say(
            f"current: {metrics.get('new', 0)} new, {metrics.get('updated', 0)} relabelled, "
            f"{metrics.get('seen_or_failed', 0)} seen or failed, {metrics.get('removed', 0)} removed"
        )
    refresh_after_run(run.output, (run.model.name, run.model.version), run.say)  # warns, never fails the run
    return metrics


def _check_error_ceiling(run: Run, parts: list[StagedPart], counts: dict, total: int) -> None:
    """More errors than --max-error-rate: an outage (a 403 on a bucket, expired credentials), not bad
    images. Nothing is committed and the run's staged files go, so a rerun re-reads every row."""
    share = counts["rows_error"] / max(total, 1)
    if share <= run.opts.max_error_rate:
        return
    reasons = run.staging.error_reasons(parts)
    run.staging.discard(parts)
    shown = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
    raise TooManyErrors(
        f"run {run.run_id}: {counts['rows_error']} of {total} rows are errors ({share:.0%} > --max-error-rate "
        f"{run.opts.max_error_rate:g}): {shown}; nothing committed; fix the cause and rerun"
    )


def format_summary(summary: dict) -> str:
    lines = [
        f"run            {summary['run_id']} ({summary.get('status')})",
        f"model          {summary['model_name']} version {summary['model_version']}",
        f"rows ok        {summary.get('rows_ok', 0)}",
        f"rows error     {summary.get('rows_error', 0)}",
        f"rows skipped   {summary.get('rows_skipped', 0)} ({summary.get('rows_not_fetched', 0)} unread: "
        "unchanged size and ETag / mtime)",
    ]
    if summary.get("status") == "committed":
        lines += [
            f"processed      {summary['rows_processed']} images in {summary['pipeline_seconds']:.1f}s "
            f"({summary['images_per_s']:.1f} images/s); {summary['rows_resumed']} resumed from staging",
            f"run date       {summary['run_date']} (tags version {summary['tags_version']})",
        ]
    lines += [f"tags table     {summary['tags_table']}", f"runs table     {summary['runs_table']}"]
    return "\n".join(lines)
