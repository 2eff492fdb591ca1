"""The catalog stage: what to tag, as a stream of Arrow batches of (image_id, uri, size, etag, mtime)
with absolute uris.

A catalog is a manifest (Parquet / CSV with `image_id`, `uri`, optionally `size`, `etag`, `mtime`) or a
folder / s3:// prefix where every image file becomes a row (`image_id` = key relative to the prefix; size
and ETag or modification time from the listing, what `unchanged` compares). Listings are paginated and
streamed; a run works from a snapshot of its catalog (`write_snapshot`) so a resumed run sees exactly the
same rows.
A manifest that cannot be read as given (empty, binary, not UTF-8, a column missing, a field too long) is
one CatalogError line naming the file, and the data row when it is known.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyarrow import acero

from .. import storage
from ..storage import aws
from ..storage.files import first_longer, first_non_utf8, local_meta, printable, s3_meta, unreadable_table
from ..tables.schema import OBJECT_FIELDS
from . import ids as ids_mod

REQUIRED_COLUMNS = ("image_id", "uri")
# size / etag / mtime: null when the catalog does not say (a manifest without them)
CATALOG_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), *OBJECT_FIELDS])
OBJECT_SCHEMA = pa.schema(OBJECT_FIELDS)
MANIFEST_EXTENSIONS = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".avif")
BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 8 << 20  # pyarrow parses CSV in blocks: no line may be longer than this
MAX_FIELD_CHARS = 8_192  # an image_id or uri: S3 keys are at most 1024 bytes, local paths 4096
GROUP_ROWS = 4_096  # snapshot row groups: the unit a pipeline read task takes (small: work starts early)


class CatalogError(storage.StorageError):
    """A catalog that cannot be used as given (missing, wrong columns, empty or duplicate ids)."""


def is_manifest(uri: str) -> bool:
    return str(uri).lower().endswith(MANIFEST_EXTENSIONS)


def iter_catalog(uri: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Batches of (image_id, uri) for a manifest file or a folder / prefix listing."""
    if is_manifest(uri):
        yield from iter_manifest(uri, batch_rows)
    else:
        yield from iter_listing(uri, batch_rows)


# ---- manifests ------------------------------------------------------------------------------------------


def iter_manifest(uri: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    uri = storage.normalize(uri)
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise CatalogError(f"catalog not found: {storage.redact(uri)}")
    if info.size == 0:
        raise CatalogError(
            f"catalog {storage.redact(uri)} is empty (0 bytes); a catalog needs image_id and uri"
        )
    base = storage.parent(uri)
    rows_seen = 0
    batches = _read_manifest(uri, fs, path, batch_rows)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # pyarrow's: the file's fault
            raise CatalogError(
                unreadable_table(f"catalog {storage.redact(uri)}", fs, path, e, CSV_BLOCK_BYTES)
            ) from None
        if batch is None:
            return
        yield _validated(batch, base, uri, rows_seen)
        rows_seen += batch.num_rows


def _read_manifest(uri: str, fs, path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    lower = uri.lower()
    if lower.endswith((".parquet", ".pq")):
        with fs.open_input_file(path) as f:
            pfile = pq.ParquetFile(f)
            names = pfile.schema_arrow.names
            _require_columns(names, uri)
            wanted = [*REQUIRED_COLUMNS, *(c for c in OBJECT_SCHEMA.names if c in names)]
            yield from pfile.iter_batches(batch_size=batch_rows, columns=wanted)
        return
    with fs.open_input_stream(path, compression="detect") as f:
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter="\t" if ".tsv" in lower else ","),
            convert_options=pacsv.ConvertOptions(
                # bytes, checked as UTF-8 in _validated, which can then say which row is not
                column_types={c: pa.binary() for c in REQUIRED_COLUMNS} | {f.name: f.type for f in OBJECT_SCHEMA},
                strings_can_be_null=False,
            ),
        )
        names = reader.schema.names
        _require_columns(names, uri)
        wanted = [*REQUIRED_COLUMNS, *(c for c in OBJECT_SCHEMA.names if c in names)]
        for batch in reader:
            yield batch.select(wanted)


def _require_columns(names: Iterable[str], uri: str) -> None:
    names = list(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        shown = ", ".join(printable(n, 40) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise CatalogError(
            f"catalog {storage.redact(uri)} has no column(s) {', '.join(missing)} "
            f"(it has: {shown or 'none'}); a catalog needs image_id and uri"
        )


def _validated(batch: pa.RecordBatch, base: str, uri: str, offset: int) -> pa.RecordBatch:
    ids = _text_column(batch, "image_id", uri, offset)
    uris = _text_column(batch, "uri", uri, offset)
    for name, col in (("image_id", ids), ("uri", uris)):
        bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
        bad = pc.fill_null(bad, True)
        if pc.any(bad).as_py():
            row = offset + pc.index(bad, True).as_py()
            raise CatalogError(f"catalog {storage.redact(uri)}: data row {row + 1} has an empty {name}")
        long = first_longer(col, MAX_FIELD_CHARS)
        if long is not None:
            raise CatalogError(
                f"catalog {storage.redact(uri)}: data row {offset + long[0] + 1} has {_a(name)} of "
                f"{long[1]} characters (at most {MAX_FIELD_CHARS})"
            )
    try:
        resolved = [storage.resolve(u, base) for u in uris.to_pylist()]
    except storage.StorageError as e:
        raise CatalogError(f"catalog {storage.redact(uri)}: {e}") from None
    objects = [_object_column(batch, field, uri) for field in OBJECT_SCHEMA]
    return pa.record_batch([ids, pa.array(resolved, pa.string()), *objects], schema=CATALOG_SCHEMA)


def _object_column(batch: pa.RecordBatch, field: pa.Field, uri: str) -> pa.Array:
    """A manifest's size / etag / mtime column as its type (null when the manifest has none); an ETag
    loses the quotes S3 puts around it, so a listing and an S3 Inventory report say the same; an empty
    one is none."""
    if field.name not in batch.schema.names:
        return pa.nulls(batch.num_rows, field.type)
    try:
        col = batch.column(field.name).cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise CatalogError(
            f"catalog {storage.redact(uri)}: column {field.name} holds {batch.column(field.name).type}, "
            f"not {field.type}"
        ) from None
    if field.name != "etag":
        return col
    etag = pc.utf8_trim(col, '"')
    return pc.if_else(pc.equal(pc.utf8_length(etag), 0), pa.scalar(None, pa.string()), etag)  # "": none


def _text_column(batch: pa.RecordBatch, name: str, uri: str, offset: int) -> pa.Array:
    """The column as UTF-8 strings; a value that is not UTF-8 (or a column that is no text) is named."""
    col = batch.column(name)
    if pa.types.is_string(col.type):
        return col
    try:
        return col.cast(pa.string())
    except pa.ArrowInvalid:  # binary → string validates UTF-8
        row, byte = first_non_utf8(col)
        raise CatalogError(
            f"catalog {storage.redact(uri)}: data row {offset + row + 1} has {_a(name)} that is not UTF-8 "
            f"text (byte {byte:#04x}); save the catalog as UTF-8"
        ) from None
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise CatalogError(
            f"catalog {storage.redact(uri)}: column {name} holds {col.type}, not text"
        ) from None


def _a(name: str) -> str:
    return "an image_id" if name == "image_id" else f"a {name}"


# ---- folder / prefix listings ---------------------------------------------------------------------------


def iter_listing(
    prefix: str, batch_rows: int = BATCH_ROWS, page_size: int = 1000
) -> Iterator[pa.RecordBatch]:
    """Every image file under a folder or s3:// prefix, in batches; the listing is never held whole."""
    uri = storage.normalize(prefix)
    files = _iter_s3(uri, page_size) if uri.startswith("s3://") else _iter_local(uri)
    rows: list[tuple] = []
    found = False
    for row in files:
        if not row[0].lower().endswith(IMAGE_EXTENSIONS):
            continue
        rows.append(row)
        if len(rows) >= batch_rows:
            yield _listed(rows)
            rows, found = [], True
    if rows:
        yield _listed(rows)
    elif not found:
        raise CatalogError(
            f"no image files under {storage.redact(uri)} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )


def _listed(rows: list[tuple]) -> pa.RecordBatch:
    """(image_id, uri, size, etag, mtime) tuples → a catalog batch."""
    columns = list(zip(*rows, strict=True))
    return pa.record_batch([pa.array(c, f.type) for c, f in zip(columns, CATALOG_SCHEMA, strict=True)], schema=CATALOG_SCHEMA)


def _iter_local(root: str) -> Iterator[tuple]:
    if not os.path.isdir(root):
        what = "is a file, not a Parquet/CSV catalog or a folder" if os.path.exists(root) else "not found"
        raise CatalogError(f"catalog {root}: {what}")
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            yield os.path.relpath(full, root).replace(os.sep, "/"), full, *local_meta(full)


def _iter_s3(uri: str, page_size: int) -> Iterator[tuple]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # "s3://b/imgs" must not list "imgs2/..."
    client = aws.boto_s3(retrying=True)  # the AWS settings read once, the SDK's own retries
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                if not key.endswith("/"):
                    yield key[len(prefix) :], f"s3://{bucket}/{key}", *s3_meta(obj)
    except client.exceptions.NoSuchBucket:
        raise CatalogError(f"catalog {uri}: bucket {bucket!r} does not exist") from None


# ---- snapshots ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    files: tuple[str, ...]
    num_rows: int
    fingerprint: str | None = None  # of its ids (`ids`), when asked for


def write_snapshot(
    batches: Iterable[pa.RecordBatch],
    dest: str,
    rows_per_file: int = 250_000,
    check_duplicates: bool = True,
    source: str = "catalog",
    schema: pa.Schema = CATALOG_SCHEMA,
    fingerprint: bool = False,
) -> Snapshot:
    """Write catalog batches as Parquet parts of `schema` under `dest` (columns it has and a batch lacks
    are null); duplicate ids raise CatalogError. With `fingerprint`, the ids' fingerprint (`ids`) too.

    Only the ids are kept in memory for the duplicate check (Arrow strings, not Python objects).
    """
    fingerprints: list[str] = []
    files: list[str] = []
    ids: list[pa.Array] = []
    writer = None
    rows_in_file = total = 0
    fs, base = storage.filesystem(dest)
    fs.create_dir(base, recursive=True)
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if writer is None or rows_in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                name = f"part-{len(files):05d}.parquet"
                files.append(storage.join(dest, name))
                writer = pq.ParquetWriter(f"{base.rstrip('/')}/{name}", schema, filesystem=fs)
                rows_in_file = 0
            writer.write_batch(conform(batch, schema), row_group_size=GROUP_ROWS)
            rows_in_file += batch.num_rows
            total += batch.num_rows
            if check_duplicates:
                ids.append(batch.column("image_id"))
            if fingerprint:
                fingerprints.append(ids_mod.fingerprint(batch.column("image_id")))
    finally:
        if writer is not None:
            writer.close()
    if check_duplicates and ids:
        _raise_on_duplicates(pa.chunked_array(ids, pa.string()), source)
    return Snapshot(tuple(files), total, ids_mod.combine(fingerprints) if fingerprint else None)


def _raise_on_duplicates(ids: pa.ChunkedArray, source: str) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup_mask = pc.greater(counts.field("counts"), 1)
    dups = counts.filter(dup_mask)
    examples = ", ".join(repr(v) for v in dups.field("values")[:5].to_pylist())
    raise CatalogError(
        f"{storage.redact(source)}: {len(dups)} image_id value(s) appear more than once (e.g. {examples}); "
        "image_id must be unique"
    )


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema = CATALOG_SCHEMA) -> pa.RecordBatch:
    """The batch with exactly the columns of `schema`, in its order (missing ones null): snapshots staged
    before a column existed still read as today's."""
    columns = [
        batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(batch.num_rows, f.type)
        for f in schema
    ]
    columns = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    return pa.record_batch(columns, schema=schema)


def row_groups(files: Iterable[str]) -> list[tuple[str, int, int]]:
    """(file, row group index, rows) of every row group of the snapshot files (footers only)."""
    out = []
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        out += [(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return out


def read_row_group(file: str, index: int, block_rows: int) -> Iterator[pa.Table]:
    """One snapshot row group as tables of at most block_rows rows."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(index)
    for start in range(0, table.num_rows, block_rows):
        yield table.slice(start, block_rows)


def snapshot_schema(files: Iterable[str]) -> pa.Schema:
    """The schema of a snapshot's files (a run's catalog snapshot, or the rows left for its pipeline)."""
    files = list(files)
    if not files:
        return CATALOG_SCHEMA
    fs, path = storage.filesystem(files[0])
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow


def read_snapshot(files: Iterable[str]) -> Iterator[pa.RecordBatch]:
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)


def without_ids(batches: Iterable[pa.RecordBatch], exclude: pa.Array) -> Iterator[pa.RecordBatch]:
    """The rows whose image_id is not in `exclude` (used when resuming a run), in no particular order.

    One anti-join (Arrow's hash join): the set of `exclude` is built once, and the batches stream
    through it (not an `is_in` per batch, which rebuilds the set every time: minutes at 10 M ids).
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    if len(exclude) == 0:
        yield first
        yield from batches
        return
    names = first.schema.names

    def chain() -> Iterator[pa.RecordBatch]:
        yield first
        yield from batches

    reader = pa.RecordBatchReader.from_batches(first.schema, chain())
    join = acero.Declaration(
        "hashjoin",
        acero.HashJoinNodeOptions("left anti", left_keys=["image_id"], right_keys=["image_id"], left_output=names),
        inputs=[
            acero.Declaration("scan", acero.ScanNodeOptions(pds.InMemoryDataset(reader))),
            acero.Declaration("table_source", acero.TableSourceNodeOptions(pa.table({"image_id": exclude}))),
        ],
    )
    for batch in join.to_reader(use_threads=False):  # one thread: the rows keep their order
        if batch.num_rows:
            yield batch.select(names)
