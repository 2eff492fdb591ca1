"""The `current` table: one row per catalog image_id ever seen, saying what its labels are now.

Each run updates it with ONE commit after its `tags` commit (app transaction `mumic-current:<run_id>`, so a
rerun of a committed run repairs a missing update and never applies one twice). The update is a merge of
the run into the table, with one source row per catalog row of the run, of four kinds:

    tagged  an ok row of this run                 → all columns (labels from this run)
    failed  an error row of this run              → status, error, uri, last seen; earlier labels stay
    seen    skipped: current already has these bytes' labels from this model → uri, status, last seen,
            size / etag / mtime (a row skipped unread, as unchanged since current's row, is one)
    copied  skipped, but current has no such row (a new id for bytes tagged before, or the id's bytes
            changed back): labels copied from the row that tagged those bytes → all columns

`prune` (the catalog is complete) also drops the rows of ids the run did not list. The merge is computed
here, streaming the table batch by batch into new files, and committed as one overwrite transaction
(`create_write_transaction`, as `tags` commits are), rather than with delta-rs's MERGE: in deltalake 1.6.6 MERGE writes Parquet with Utf8View columns, which pyarrow 25 datasets, and
DuckDB over them, cannot filter ("no kernel matching input types (string, string_view)").
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from deltalake import CommitProperties, Transaction
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction

from .. import storage
from ..tables import CURRENT_SCHEMA, LABEL_COLUMNS, arrow_dataset, current_app_id, open_or_create, open_table
from ..tables.schema import OBJECT_COLUMNS
from .staging import StagedPart, file_stats, parquet_bytes

KIND = "_kind"
SOURCE_SCHEMA = CURRENT_SCHEMA.append(pa.field(KIND, pa.string()))
_PARTIAL_UPDATES = ("uri", "status", "error", "last_seen_run_id", "last_seen_at")  # failed and seen rows
ROWS_PER_FILE = 50_000  # ~130 MB of Parquet input per file with 512-d embeddings
COMMIT_ATTEMPTS = 3  # another run's update may commit between our read and our write: re-merge


@dataclass(frozen=True)
class RunFacts:
    """What the merge needs to know of the run."""

    run_id: str
    run_date: str
    tags_version: int  # the run's own commit on `tags`
    model_name: str
    model_version: str
    seen_at: dt.datetime


def is_merged(current_uri: str, run_id: str) -> bool:
    table = open_table(current_uri)
    return table is not None and table.transaction_version(current_app_id(run_id)) is not None


def update_current(
    output: str, run: RunFacts, parts: list[StagedPart] | None, prune: bool = False
) -> dict | None:
    """Merge the run into `current`; counts of what changed, or None when this run was merged already.

    `parts` are the run's staged parts (their skipped rows); None when staging is gone (then only the
    run's own `tags` rows are merged, and pruning is refused: the skipped ids are unknown).
    """
    uri = storage.join(output, "current")
    if prune and parts is None:
        raise ValueError(f"run {run.run_id}: its staging is gone, so the ids it skipped are unknown: not pruning")
    for attempt in range(COMMIT_ATTEMPTS):
        table = open_or_create(uri, CURRENT_SCHEMA)
        if table.transaction_version(current_app_id(run.run_id)) is not None:
            return None
        held = _held(table)
        source = pa.concat_tables([_tagged_rows(output, run, parts or []), *_skipped_rows(output, run, parts or [], held)])
        counts: Counter = Counter()
        actions = _write_files(uri, run.run_id, attempt, _merged(table, source, prune, counts))
        try:
            table.create_write_transaction(
                actions,
                mode="overwrite",
                schema=_evolved(table),
                partition_by=[],
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(current_app_id(run.run_id), 1, int(time.time() * 1000))]
                ),
            )
        except CommitFailedError:  # another run updated `current` since we read it: merge again
            for action in actions:
                storage.delete_file(storage.join(uri, action.path))
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise
            continue
        return dict(counts)
    return None


def _write_files(uri: str, run_id: str, attempt: int, batches: Iterator[pa.RecordBatch]) -> list[AddAction]:
    """The merged rows as Parquet files of at most ROWS_PER_FILE rows in the table folder (invisible
    until the commit adds them)."""
    actions, pending, rows = [], [], 0

    def flush() -> None:
        nonlocal pending, rows
        table = pa.Table.from_batches([_conformed(b) for b in pending], schema=CURRENT_SCHEMA)
        name = f"part-{run_id}-{attempt}-{len(actions):05d}.parquet"
        data = parquet_bytes(table)
        storage.write_bytes(storage.join(uri, name), data)
        actions.append(AddAction(name, len(data), {}, int(time.time() * 1000), True, file_stats(table)))
        pending, rows = [], 0

    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= ROWS_PER_FILE:
            flush()
    if rows:
        flush()
    return actions


def _evolved(table):
    """The table's schema, or today's when the table was written before a column existed: the overwrite
    adds it (readers of older versions never see it)."""
    schema = table.schema()
    return schema if set(CURRENT_SCHEMA.names).issubset(schema.to_arrow().names) else CURRENT_SCHEMA


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A column of a table batch as today's type; null when the table was written before it existed."""
    field = CURRENT_SCHEMA.field(name)
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, field.type)
    return batch.column(name).cast(field.type)


def _conformed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch with today's columns (rows built before a column existed get it null)."""
    if batch.schema == CURRENT_SCHEMA:
        return batch
    return pa.RecordBatch.from_arrays([_column(batch, n) for n in CURRENT_SCHEMA.names], schema=CURRENT_SCHEMA)


def _held(table) -> pa.Table:
    """(image_id, content_sha256, model_name, model_version) of the rows with labels: who holds what."""
    return arrow_dataset(table).to_table(
        columns=["image_id", "content_sha256", "model_name", "model_version"],
        filter=pds.field("labels").is_valid(),
    )


def _merged(table, source: pa.Table, prune: bool, counts: Counter) -> Iterator[pa.RecordBatch]:
    """The table's rows with the source applied, batch by batch, then the source's new ids."""
    position = {image_id: i for i, image_id in enumerate(source.column("image_id").to_pylist())}
    matched = np.zeros(source.num_rows, bool)
    batches = arrow_dataset(table).to_batches()
    for batch in batches:
        pos = [position.get(i) for i in batch.column("image_id").to_pylist()]
        hit = np.array([p is not None for p in pos], bool)
        matched[[p for p in pos if p is not None]] = True
        out = _apply(batch, source, pa.array(pos, pa.int64()), hit, counts)
        if prune:
            counts["removed"] += int((~hit).sum())
            out = out.filter(pa.array(hit))
        if out.num_rows:
            yield out
    kinds = source.column(KIND).to_numpy(zero_copy_only=False)
    new = source.filter(pa.array(~matched & (kinds != "seen"))).drop_columns([KIND])
    counts["new"] += new.num_rows
    yield from new.cast(CURRENT_SCHEMA).to_batches()


def _apply(batch: pa.RecordBatch, source: pa.Table, pos: pa.Array, hit: np.ndarray, counts: Counter) -> pa.RecordBatch:
    """A batch of the table with its rows that the source names updated (whole, or the partial columns)."""
    if not hit.any():
        return pa.RecordBatch.from_arrays([_column(batch, n) for n in CURRENT_SCHEMA.names], schema=CURRENT_SCHEMA)
    taken = source.take(pc.fill_null(pos, 0))
    kind = taken.column(KIND).to_numpy(zero_copy_only=False)
    old, new = batch.column("tags_version"), taken.column("tags_version")
    newer = pc.fill_null(pc.or_(pc.is_null(old), pc.greater_equal(new, old)), False).to_numpy(zero_copy_only=False)
    full = hit & np.isin(kind, ["tagged", "copied"]) & newer
    partial = full | (hit & np.isin(kind, ["failed", "seen"]))
    listed = full | (hit & (kind == "seen"))  # a failed row keeps what was listed with its last good bytes
    counts["updated"] += int(full.sum())
    counts["seen_or_failed"] += int((partial & ~full).sum())
    columns = []
    for name in CURRENT_SCHEMA.names:
        mask = pa.array(partial if name in _PARTIAL_UPDATES else listed if name in OBJECT_COLUMNS else full)
        columns.append(pc.if_else(mask, taken.column(name), _column(batch, name)))
    return pa.RecordBatch.from_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns], schema=CURRENT_SCHEMA)


def _constant(n: int, value, type_: pa.DataType) -> pa.Array:
    return pa.nulls(n, type_) if value is None else pa.array([value] * n, type_)


def _shape(rows: pa.Table, kind: str, run: RunFacts) -> pa.Table:
    """Rows with some of the current columns → the MERGE source schema (missing columns null)."""
    n = rows.num_rows
    filled = {
        "last_seen_run_id": _constant(n, run.run_id, pa.string()),
        "last_seen_at": _constant(n, run.seen_at, CURRENT_SCHEMA.field("last_seen_at").type),
        KIND: _constant(n, kind, pa.string()),
    }
    columns = []
    for field in SOURCE_SCHEMA:
        if field.name in filled:
            columns.append(filled[field.name])
        elif field.name in rows.column_names:
            columns.append(rows.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=SOURCE_SCHEMA)


def _tagged_rows(output: str, run: RunFacts, parts: list[StagedPart]) -> pa.Table:
    """The run's own rows of `tags` (ok → tagged, with what the catalog said of their objects; error →
    failed)."""
    tags = open_table(storage.join(output, "tags"))
    rows = arrow_dataset(tags).to_table(
        columns=[c for c in CURRENT_SCHEMA.names if c in tags.schema().to_arrow().names],
        filter=(pds.field("run_date") == run.run_date) & (pds.field("run_id") == run.run_id),
    )
    ok = pc.fill_null(pc.equal(rows.column("status"), "ok"), False)
    tagged = rows.filter(ok).append_column("tags_version", _constant(int(pc.sum(ok).as_py() or 0), run.tags_version, pa.int64()))
    objects = [pq.read_table(path, filesystem=fs) for fs, path in (storage.filesystem(p.objects_file) for p in parts if p.objects_file)]
    if objects:  # looked up, not joined: Arrow's join takes no list columns (labels, embedding)
        objects = pa.concat_tables(objects)
        at = pc.index_in(tagged.column("image_id"), value_set=objects.column("image_id").combine_chunks())
        for name in OBJECT_COLUMNS:
            tagged = tagged.append_column(name, objects.column(name).take(at))
    failed = rows.filter(pc.invert(ok)).select(["image_id", "uri", "status", "error"])
    return pa.concat_tables([_shape(tagged, "tagged", run), _shape(failed, "failed", run)])


def _skipped(parts: list[StagedPart]) -> Iterator[pa.Table]:
    for part in parts:
        if part.skipped_file:
            fs, path = storage.filesystem(part.skipped_file)
            yield pq.read_table(path, filesystem=fs)


def _skipped_rows(output: str, run: RunFacts, parts: list[StagedPart], known: pa.Table) -> list[pa.Table]:
    """Skipped rows as `seen` (current holds these bytes' labels from this model for this id) or
    `copied` (labels copied from the row that tagged those bytes: current's, else the newest in tags)."""
    chunks = list(_skipped(parts))
    if not chunks:
        return []
    skipped = pa.concat_tables(chunks, promote_options="permissive")
    for name in ("uri", *OBJECT_COLUMNS):  # staged by an older version
        if name not in skipped.column_names:
            skipped = skipped.append_column(name, pa.nulls(skipped.num_rows, CURRENT_SCHEMA.field(name).type))
    mine = known.filter(
        (pc.field("model_name") == run.model_name) & (pc.field("model_version") == run.model_version)
    )
    joined = skipped.join(mine.select(["image_id", "content_sha256"]).rename_columns(["image_id", "held"]), "image_id")
    # a row skipped unread has no hash of its own: it is unchanged since the row current holds
    hashes = pc.coalesce(joined.column("content_sha256"), joined.column("held"))
    joined = joined.set_column(joined.schema.get_field_index("content_sha256"), "content_sha256", hashes)
    is_seen = pc.fill_null(pc.equal(joined.column("held"), joined.column("content_sha256")), False)
    seen = joined.filter(is_seen).select(["image_id", "uri", *OBJECT_COLUMNS])
    seen = seen.append_column("status", _constant(seen.num_rows, "ok", pa.string()))
    out = [_shape(seen, "seen", run)]
    need = joined.filter(pc.and_(pc.invert(is_seen), pc.is_valid(joined.column("content_sha256"))))
    need = need.select(["image_id", "uri", "content_sha256", *OBJECT_COLUMNS])
    if need.num_rows:
        labels = _labels_by_content(output, run, pc.unique(need.column("content_sha256")))
        by_digest = {d: i for i, d in enumerate(labels.column("content_sha256").to_pylist())}
        found = [by_digest.get(d) for d in need.column("content_sha256").to_pylist()]
        keep = pa.array([f is not None for f in found])
        source = labels.drop_columns(["content_sha256"]).take(pa.array([f for f in found if f is not None], pa.int64()))
        copied = need.filter(keep)
        for name in source.column_names:
            copied = copied.append_column(name, source.column(name))
        copied = copied.append_column("status", _constant(copied.num_rows, "ok", pa.string()))
        out.append(_shape(copied, "copied", run))
    return out


def _labels_by_content(output: str, run: RunFacts, digests: pa.Array) -> pa.Table:
    """For each content hash, the labels of its newest ok row by this model (current first, then tags)."""
    wanted = [c for c in LABEL_COLUMNS if c not in ("image_id",)]
    condition = (
        pds.field("content_sha256").isin(digests.to_pylist())
        & (pds.field("model_name") == run.model_name)
        & (pds.field("model_version") == run.model_version)
    )
    current = open_table(storage.join(output, "current"))
    found = arrow_dataset(current).to_table(columns=wanted, filter=condition & pds.field("labels").is_valid())
    missing = pc.invert(pc.is_in(digests, value_set=found.column("content_sha256")))
    rest = digests.filter(missing)
    if len(rest):
        tags = open_table(storage.join(output, "tags"))
        history = arrow_dataset(tags).to_table(
            columns=[c for c in wanted if c != "tags_version"],
            filter=pds.field("content_sha256").isin(rest.to_pylist()) & (pds.field("status") == "ok")
            & (pds.field("model_name") == run.model_name) & (pds.field("model_version") == run.model_version),
        )
        history = history.append_column("tags_version", pa.nulls(history.num_rows, pa.int64()))
        found = pa.concat_tables([found, history.select(found.column_names)])
    newest = found.sort_by([("content_sha256", "ascending"), ("processed_at", "descending")])
    first = pc.not_equal(newest.column("content_sha256"), pc.fill_null(_shift(newest.column("content_sha256")), ""))
    return newest.filter(first)


def _shift(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column moved down by one (null first): marks the first row of each sorted group."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pa.concat_arrays([pa.nulls(1, arr.type), arr.slice(0, max(len(arr) - 1, 0))])
