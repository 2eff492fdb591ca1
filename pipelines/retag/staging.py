"""Staging: the pipeline output of a run as Parquet parts, invisible until the run commits.

A part's data file is written inside the `tags` table folder (`run_date=D/part-<run_id>-<seq>.parquet`);
its skipped ids go to `_staging/<run_id>/skipped/`, what the catalog said of its tagged objects (size, ETag,
mtime: `current` keeps them) to `_staging/<run_id>/objects/`, and a small JSON record in
`_staging/<run_id>/parts/` is written last, so a part with a record is complete: a resumed run starts after
the recorded parts. The pipeline's workers stage its parts (`write_parts`, the last stage: only the
records reach the driver); the driver stages the unchanged rows it finds before the pipeline (`PartWriter`).
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..tables import PARTITION, TAGS_FILE_SCHEMA
from ..tables.schema import OBJECT_COLUMNS
from . import ids as ids_mod

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
    objects_file: str | None = None  # URI of (image_id, size, etag, mtime) of its ok rows (absent: staged before)
    rows_not_fetched: int = 0  # skipped rows never downloaded (unchanged size and ETag / mtime)
    # how many ids the part holds and their fingerprint (`ids`): exactly-once in O(parts) (absent: older)
    ids_count: int | None = None
    ids_fingerprint: str | None = None

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_error + self.rows_skipped


PART_FIELDS = tuple(f.name for f in fields(StagedPart))
MAX_PART_BYTES = 256 << 20  # a part's rows in memory at most (about): one task's, or the driver's
READ_THREADS = 32  # part records read at once: on S3 each is one GET (~20 ms), thousands per run

STAGING_DIR = "_staging"
LEASE_FILE = "lease.json"  # `lease`: who writes the run now


def staging_root(output: str) -> str:
    """`<output>/_staging`: one folder per run id that is being written (or was abandoned)."""
    return storage.join(output, STAGING_DIR)


class RunStaging:
    """The staging area of one run: `<output>/_staging/<run_id>/` plus its data files inside `tags`."""

    def __init__(self, output: str, run_id: str):
        self.output = storage.normalize(output)
        self.run_id = run_id
        self.tags_uri = storage.join(self.output, "tags")
        self.dir = storage.join(staging_root(self.output), run_id)

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    @property
    def lease_uri(self) -> str:
        return self.path(LEASE_FILE)

    def read_manifest(self) -> dict | None:
        text = storage.read_text(self.path("run.json"))
        return None if text is None else json.loads(text)

    def write_manifest(self, manifest: dict) -> None:
        storage.write_bytes(self.path("run.json"), json.dumps(manifest, indent=2).encode())

    def parts(self) -> list[StagedPart]:
        """The recorded parts, by seq; the records are read concurrently (one request each on S3)."""
        uris = [uri for uri, _ in storage.list_files(self.path("parts")) if uri.endswith(".json")]
        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(uris)))) as pool:
            texts = list(pool.map(storage.read_text, uris))
        return sorted((StagedPart(**json.loads(t or "{}")) for t in texts), key=lambda p: p.seq)

    def staged_ids(self, parts: list[StagedPart]) -> pa.Array:
        """image_id of every staged row (tags rows and skipped rows) of the given parts."""
        ids: list[pa.ChunkedArray] = []
        for p in parts:
            for uri in ([storage.join(self.tags_uri, p.data_file)] if p.data_file else []) + (
                [p.skipped_file] if p.skipped_file else []
            ):
                fs, path = storage.filesystem(uri)
                ids.append(pq.read_table(path, columns=["image_id"], filesystem=fs).column(0))
        if not ids:
            return pa.array([], pa.string())
        return pa.chunked_array([c for a in ids for c in a.chunks], pa.string()).combine_chunks()

    def error_reasons(self, parts: list[StagedPart]) -> Counter:
        """How many staged error rows per reason (the part of `error` before the first ':')."""
        reasons: Counter = Counter()
        for p in parts:
            if p.data_file and p.rows_error:
                fs, path = storage.filesystem(storage.join(self.tags_uri, p.data_file))
                errors = pq.read_table(path, columns=["status", "error"], filesystem=fs)
                errors = errors.filter(pc.equal(errors.column("status"), "error")).column("error")
                reasons.update(str(e or "unknown").split(":", 1)[0] for e in errors.to_pylist())
        return reasons

    def discard(self, parts: list[StagedPart]) -> None:
        """Remove everything the run staged (its data files in `tags` too): the run starts over."""
        for p in parts:
            if p.data_file:
                storage.delete_file(storage.join(self.tags_uri, p.data_file))
        self.cleanup()

    def cleanup(self) -> None:
        storage.delete_dir(self.dir)


def file_stats(table: pa.Table) -> str:
    """A data file's Delta stats: row count, null counts, min/max of the short exact columns."""
    stats: dict = {"numRecords": table.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_timestamp(col.type):
            stats["nullCount"][name] = col.null_count
        if name in _STATS_MINMAX and col.null_count < len(col):
            mm = pc.min_max(col)
            stats["minValues"][name] = mm["min"].as_py()
            stats["maxValues"][name] = mm["max"].as_py()
    return json.dumps(stats)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class PartWriter:
    """Buffers rows on the driver (the unchanged rows it stages before the pipeline) and stages them as
    parts of `rows_per_part` rows, or fewer when the buffer reaches `max_part_bytes` (wide embeddings and
    big taxonomies make rows heavy): the driver's memory stays bounded whatever the catalog size."""

    def __init__(
        self,
        staging: RunStaging,
        run_date: str,
        constants: dict[str, str],
        rows_per_part: int,
        first_seq: int = 0,
        max_part_bytes: int = MAX_PART_BYTES,
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
        return stage_part(self.staging, self.run_date, self.constants, self.seq, table)


def stage_part(staging: RunStaging, run_date: str, constants: dict[str, str], seq: int, table: pa.Table) -> StagedPart:
    """Write one part of output rows: its tags data file, skipped ids and objects, then its record (last:
    a part with a record is complete). The same rows and seq again overwrite the same files."""
    status = table.column("status")
    is_skipped = pc.fill_null(pc.equal(status, "skipped"), False)
    tagged = table.filter(pc.invert(is_skipped))
    skipped = table.filter(is_skipped)
    name = f"part-{staging.run_id}-{seq:06d}.parquet"
    data_file, data_size, stats = None, 0, ""
    if tagged.num_rows:
        tagged = _tags_columns(tagged, constants)
        data = parquet_bytes(tagged)
        data_file = f"{PARTITION}={run_date}/{name}"
        storage.write_bytes(storage.join(staging.tags_uri, data_file), data)
        data_size, stats = len(data), file_stats(tagged)
    skipped_file = None
    if skipped.num_rows:
        skipped_file = staging.path("skipped", name)
        kept = [c for c in ("image_id", "uri", "content_sha256", *OBJECT_COLUMNS) if c in skipped.column_names]
        storage.write_bytes(skipped_file, parquet_bytes(skipped.select(kept)))
    ok = int(pc.sum(pc.fill_null(pc.equal(status, "ok"), False).cast(pa.int64())).as_py() or 0)
    part = StagedPart(
        seq=seq,
        data_file=data_file,
        data_size=data_size,
        modification_time=int(time.time() * 1000),
        stats=stats,
        rows_ok=ok,
        rows_error=table.num_rows - ok - skipped.num_rows,
        skipped_file=skipped_file,
        rows_skipped=skipped.num_rows,
        objects_file=_write_objects(staging, table, name),
        rows_not_fetched=skipped.column("content_sha256").null_count if skipped.num_rows else 0,
        ids_count=table.num_rows,
        ids_fingerprint=ids_mod.fingerprint(table.column("image_id")),
    )
    # the record last: a part with a record is complete
    storage.write_bytes(staging.path("parts", f"part-{seq:06d}.json"), json.dumps(asdict(part)).encode())
    return part


def _tags_columns(tagged: pa.Table, constants: dict[str, str]) -> pa.Table:
    """The rows as the tags data file's schema, the run's constants (model, run id, ...) filled in."""
    n = tagged.num_rows
    columns = [
        pa.nulls(n, f.type).fill_null(constants[f.name]) if f.name in constants else tagged.column(f.name).cast(f.type)
        for f in TAGS_FILE_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=TAGS_FILE_SCHEMA)


def _write_objects(staging: RunStaging, table: pa.Table, name: str) -> str | None:
    """What the catalog said of the part's ok objects, for `current` (tags has no such columns)."""
    if not set(OBJECT_COLUMNS).issubset(table.column_names):
        return None
    ok = table.filter(pc.fill_null(pc.equal(table.column("status"), "ok"), False))
    ok = ok.select(["image_id", *OBJECT_COLUMNS])
    if ok.num_rows == 0 or all(ok.column(c).null_count == ok.num_rows for c in OBJECT_COLUMNS):
        return None
    uri = staging.path("objects", name)
    storage.write_bytes(uri, parquet_bytes(ok))
    return uri


def split_part(table: pa.Table, rows_per_part: int, max_part_bytes: int) -> Iterator[pa.Table]:
    """`table` in slices of at most `rows_per_part` rows and (about) `max_part_bytes` bytes each: the
    same rows always split the same way."""
    if not table.num_rows:
        return
    row_bytes = max(1, table.nbytes // table.num_rows)
    step = max(1, min(rows_per_part, max_part_bytes // row_bytes))
    for start in range(0, table.num_rows, step):
        yield table.slice(start, step)


def write_parts(
    batch: pa.Table,
    staging: RunStaging,
    run_date: str,
    constants: dict[str, str],
    rows_per_part: int,
    max_part_bytes: int,
    seq_base: int,
) -> pa.Table:
    """The pipeline's last stage, on a worker: stage `batch` as parts and return their records, one
    small row each (no embedding reaches the driver). A part's seq comes from its ids (`part_seq`): the
    same rows get the same seq, so a retried task overwrites its own files, with no one to ask."""
    parts = []
    for table in split_part(batch, rows_per_part, max_part_bytes):
        seq = part_seq(seq_base, ids_mod.fingerprint(table.column("image_id")))
        parts.append(stage_part(staging, run_date, constants, seq, table))
    return pa.Table.from_pylist([asdict(p) for p in parts], schema=PART_SCHEMA)


PART_SEQ_SPAN = 10**12  # seqs a pipeline attempt spreads its parts over: two parts collide at ~1e-12 each


def part_seq(base: int, fingerprint: str) -> int:
    """The seq of a pipeline part: above `base` (the parts staged before this attempt), by its ids."""
    return base + 1 + int(fingerprint.rsplit(":", 1)[1], 16) % PART_SEQ_SPAN


# A part record in Arrow form (what the pipeline returns to the driver): one field per StagedPart field.
PART_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("data_file", pa.string()),
        ("data_size", pa.int64()),
        ("modification_time", pa.int64()),
        ("stats", pa.string()),
        ("rows_ok", pa.int64()),
        ("rows_error", pa.int64()),
        ("skipped_file", pa.string()),
        ("rows_skipped", pa.int64()),
        ("objects_file", pa.string()),
        ("rows_not_fetched", pa.int64()),
        ("ids_count", pa.int64()),
        ("ids_fingerprint", pa.string()),
    ]
)
