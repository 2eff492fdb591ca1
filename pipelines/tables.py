"""The tables stage: the `tags` and `runs` Delta tables, and the staging that makes a run one commit.

Commit protocol (one retag run = one Delta transaction on `tags`):
1. The driver streams the pipeline's output into Parquet *parts*. A part's data file is written inside the
   `tags` table folder (`run_date=D/part-<run_id>-<seq>.parquet`) but is invisible to readers until a
   commit adds it; its skipped ids go to `_staging/<run_id>/skipped/`, and a small JSON record in
   `_staging/<run_id>/parts/` is written last, so a part with a record is complete.
2. When every catalog row is staged, ONE transaction adds all data files, carrying the app transaction
   `mumic-retag:<run_id>` and the run's summary in its commit metadata.
3. The `runs` row is appended next (app transaction `mumic-runs:<run_id>`), then staging is removed.
A crash before 2 leaves nothing visible and a rerun with the same id resumes from the recorded parts;
a crash between 2 and 3 is repaired by the rerun from the commit metadata; a committed run id is never
written again. One writer per run id at a time (the nightly scheduler's job).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction

from . import arrow_fs, storage

LABEL_TYPE = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())])
LABELS_TYPE = pa.list_(LABEL_TYPE)
FLOATS_TYPE = pa.list_(pa.float32())
UTC_TS = pa.timestamp("us", tz="UTC")
PARTITION = "run_date"

TAGS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("content_sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("labels", LABELS_TYPE),
        ("scores", FLOATS_TYPE),
        ("embedding", FLOATS_TYPE),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("taxonomy_sha256", pa.string()),
        ("run_id", pa.string()),
        ("run_date", pa.string()),
        ("processed_at", UTC_TS),
    ]
)
# Data files hold every column but the partition column, whose value lives in the commit (Delta's rule).
TAGS_FILE_SCHEMA = pa.schema([f for f in TAGS_SCHEMA if f.name != PARTITION])

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_date", pa.string()),
        ("started_at", UTC_TS),
        ("finished_at", UTC_TS),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("taxonomy", pa.string()),  # JSON list of label names
        ("catalog", pa.string()),
        ("rows_ok", pa.int64()),
        ("rows_error", pa.int64()),
        ("rows_skipped", pa.int64()),
    ]
)
RUN_FIELDS = tuple(RUNS_SCHEMA.names)

# Columns whose min/max go into the commit's per-file stats (short, exact values: safe for data skipping).
_STATS_MINMAX = (
    "image_id",
    "content_sha256",
    "status",
    "model_name",
    "model_version",
    "taxonomy_sha256",
    "run_id",
)


def retag_app_id(run_id: str) -> str:
    return f"mumic-retag:{run_id}"


def runs_app_id(run_id: str) -> str:
    return f"mumic-runs:{run_id}"


# ---- tables ---------------------------------------------------------------------------------------------


def open_table(uri: str) -> DeltaTable | None:
    # Not DeltaTable.is_deltatable: it keeps the GIL during its S3 requests, which stalls every other Python
    # thread of the process (a threaded S3 server in the same process never answers it).
    try:
        return DeltaTable(uri, storage_options=storage.delta_storage_options(uri))
    except TableNotFoundError:
        return None


def open_or_create(uri: str, schema: pa.Schema, partition_by: list[str] | None = None) -> DeltaTable:
    table = open_table(uri)
    if table is not None:
        return table
    return DeltaTable.create(
        uri,
        schema,
        partition_by=partition_by,
        mode="ignore",
        storage_options=storage.delta_storage_options(uri),
    )


def is_committed(tags_uri: str, run_id: str) -> bool:
    table = open_table(tags_uri)
    return table is not None and table.transaction_version(retag_app_id(run_id)) is not None


def iter_ok_hashes(tags_uri: str, model_name: str, model_version: str) -> Iterator[pa.Array]:
    """content_sha256 of every row tagged `ok` by this model name+version in a committed run, in batches."""
    table = open_table(tags_uri)
    if table is None:
        return
    ds = table.to_pyarrow_dataset()
    condition = (
        (pds.field("model_name") == model_name)
        & (pds.field("model_version") == model_version)
        & (pds.field("status") == "ok")
    )
    for batch in ds.to_batches(columns=["content_sha256"], filter=condition):
        if batch.num_rows:
            yield batch.column(0)


def commit_run(
    tags_uri: str, run_id: str, run_date: str, parts: list[StagedPart], run_row: dict
) -> int | None:
    """Add every staged data file to `tags` in ONE transaction; None when the run id is already committed."""
    table = open_or_create(tags_uri, TAGS_SCHEMA, [PARTITION])
    if table.transaction_version(retag_app_id(run_id)) is not None:
        return None
    actions = [
        AddAction(p.data_file, p.data_size, {PARTITION: run_date}, p.modification_time, True, p.stats)
        for p in parts
        if p.data_file
    ]
    now_ms = int(time.time() * 1000)
    table.create_write_transaction(
        actions,
        mode="append",
        schema=table.schema(),
        partition_by=[PARTITION],
        commit_properties=CommitProperties(
            custom_metadata={"mumic.run_id": run_id, "mumic.run": json.dumps(run_row)},
            app_transactions=[Transaction(retag_app_id(run_id), 1, now_ms)],
        ),
    )
    return DeltaTable(tags_uri, storage_options=storage.delta_storage_options(tags_uri)).version()


def run_row_from_history(tags_uri: str, run_id: str) -> dict | None:
    """The run summary recorded in the commit that added the run's rows (to repair a missing runs row)."""
    table = open_table(tags_uri)
    if table is None:
        return None
    for commit in table.history():
        if commit.get("mumic.run_id") == run_id and commit.get("mumic.run"):
            return json.loads(commit["mumic.run"])
    return None


def ensure_run_row(runs_uri: str, run_row: dict) -> bool:
    """Append the run's row to `runs` unless it is there already; True when written now."""
    table = open_or_create(runs_uri, RUNS_SCHEMA)
    app_id = runs_app_id(run_row["run_id"])
    if table.transaction_version(app_id) is not None:
        return False
    row = dict(run_row)
    for key in ("started_at", "finished_at"):
        row[key] = dt.datetime.fromisoformat(row[key])
    data = pa.Table.from_pylist([{k: row[k] for k in RUN_FIELDS}], schema=RUNS_SCHEMA)
    write_deltalake(
        table,
        data,
        mode="append",
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id, 1, int(time.time() * 1000))]
        ),
    )
    return True


# ---- staging --------------------------------------------------------------------------------------------


@dataclass
class StagedPart:
    seq: int
    data_file: str | None  # path relative to the tags table root
    data_size: int
    modification_time: int
    stats: str
    rows_ok: int
    rows_error: int
    skipped_file: str | None  # URI of the skipped ids' Parquet file
    rows_skipped: int


class RunStaging:
    """The staging area of one run: `<output>/_staging/<run_id>/` plus its data files inside `tags`."""

    def __init__(self, output: str, run_id: str):
        self.output = storage.normalize(output)
        self.run_id = run_id
        self.tags_uri = storage.join(self.output, "tags")
        self.dir = storage.join(self.output, "_staging", run_id)

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def read_manifest(self) -> dict | None:
        text = arrow_fs.read_text(self.path("run.json"))
        return None if text is None else json.loads(text)

    def write_manifest(self, manifest: dict) -> None:
        arrow_fs.write_atomic(self.path("run.json"), json.dumps(manifest, indent=2).encode())

    def parts(self) -> list[StagedPart]:
        out = []
        for uri, _ in arrow_fs.list_files(self.path("parts")):
            if uri.endswith(".json"):
                out.append(StagedPart(**json.loads(arrow_fs.read_text(uri) or "{}")))
        return sorted(out, key=lambda p: p.seq)

    def staged_ids(self, parts: list[StagedPart]) -> pa.Array:
        """image_id of every staged row (tags rows and skipped rows) of the given parts."""
        ids: list[pa.ChunkedArray] = []
        for p in parts:
            for uri in ([storage.join(self.tags_uri, p.data_file)] if p.data_file else []) + (
                [p.skipped_file] if p.skipped_file else []
            ):
                fs, path = arrow_fs.filesystem(uri)
                ids.append(pq.read_table(path, columns=["image_id"], filesystem=fs).column(0))
        if not ids:
            return pa.array([], pa.string())
        return pa.chunked_array([c for a in ids for c in a.chunks], pa.string()).combine_chunks()

    def cleanup(self) -> None:
        arrow_fs.delete_dir(self.dir)


def _stats(table: pa.Table) -> str:
    stats: dict = {"numRecords": table.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name in TAGS_FILE_SCHEMA.names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_timestamp(col.type):
            stats["nullCount"][name] = col.null_count
        if name in _STATS_MINMAX and col.null_count < len(col):
            mm = pc.min_max(col)
            stats["minValues"][name] = mm["min"].as_py()
            stats["maxValues"][name] = mm["max"].as_py()
    return json.dumps(stats)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class PartWriter:
    """Buffers the pipeline's output on the driver and stages it as parts of `rows_per_part` rows, or
    fewer when the buffer reaches `max_part_bytes` (wide embeddings and big taxonomies make rows heavy):
    the driver's memory stays bounded whatever the catalog size."""

    def __init__(
        self,
        staging: RunStaging,
        run_date: str,
        constants: dict[str, str],
        rows_per_part: int,
        first_seq: int = 0,
        max_part_bytes: int = 256 << 20,
    ):
        self.staging = staging
        self.run_date = run_date
        self.constants = constants  # model_name, model_version, taxonomy_sha256, run_id
        self.rows_per_part = rows_per_part
        self.max_part_bytes = max_part_bytes
        self.seq = first_seq
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self.parts: list[StagedPart] = []

    def add(self, batch: pa.Table) -> list[StagedPart]:
        """Buffer a batch of output rows; returns the parts flushed because of it."""
        if batch.num_rows:
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            self._pending_bytes += batch.nbytes
        flushed = []
        while self._pending_rows >= self.rows_per_part:
            flushed.append(self.flush(self.rows_per_part))
        if self._pending_bytes >= self.max_part_bytes:
            flushed.append(self.flush())
        return flushed

    def flush(self, max_rows: int | None = None) -> StagedPart | None:
        if not self._pending_rows:
            return None
        table = pa.concat_tables(self._pending, promote_options="permissive")
        if max_rows is not None and table.num_rows > max_rows:
            table, rest = table.slice(0, max_rows), table.slice(max_rows)
            self._pending, self._pending_rows = [rest], rest.num_rows
            self._pending_bytes = rest.nbytes
        else:
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        part = self._write_part(table)
        self.parts.append(part)
        return part

    def _write_part(self, table: pa.Table) -> StagedPart:
        self.seq += 1
        status = table.column("status")
        is_skipped = pc.fill_null(pc.equal(status, "skipped"), False)
        tagged = table.filter(pc.invert(is_skipped))
        skipped = table.filter(is_skipped)
        name = f"part-{self.staging.run_id}-{self.seq:06d}.parquet"
        data_file, data_size, stats = None, 0, ""
        if tagged.num_rows:
            n = tagged.num_rows
            columns = []
            for field in TAGS_FILE_SCHEMA:
                if field.name in self.constants:
                    columns.append(pa.nulls(n, field.type).fill_null(self.constants[field.name]))
                else:
                    columns.append(tagged.column(field.name).cast(field.type))
            tagged = pa.Table.from_arrays(columns, schema=TAGS_FILE_SCHEMA)
            data = _parquet_bytes(tagged)
            data_file = f"{PARTITION}={self.run_date}/{name}"
            arrow_fs.write_atomic(storage.join(self.staging.tags_uri, data_file), data)
            data_size, stats = len(data), _stats(tagged)
        skipped_file = None
        if skipped.num_rows:
            skipped_file = self.staging.path("skipped", name)
            arrow_fs.write_atomic(
                skipped_file, _parquet_bytes(skipped.select(["image_id", "content_sha256"]))
            )
        ok = int(pc.sum(pc.fill_null(pc.equal(status, "ok"), False).cast(pa.int64())).as_py() or 0)
        part = StagedPart(
            seq=self.seq,
            data_file=data_file,
            data_size=data_size,
            modification_time=int(time.time() * 1000),
            stats=stats,
            rows_ok=ok,
            rows_error=table.num_rows - ok - skipped.num_rows,
            skipped_file=skipped_file,
            rows_skipped=skipped.num_rows,
        )
        # the record last: a part with a record is complete
        arrow_fs.write_atomic(
            self.staging.path("parts", f"part-{self.seq:06d}.json"), json.dumps(asdict(part)).encode()
        )
        return part
